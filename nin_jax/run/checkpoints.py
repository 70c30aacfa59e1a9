"""Checkpoints in <workdir>/checkpoints, written with orbax, so that a run killed at any step
continues exactly when the same command is run again.

A checkpoint holds everything the rest of the run depends on:
  * the host copy of the train state: parameters, optimizer state, step and dropout key (every
    step's dropout key is derived from the step, see `steps.TrainState`), batch-norm statistics
    and the weights' moving average where the run has them;
  * the running train-metric sums and training seconds of the unfinished epoch;
  * the config fields that fix the shapes, the data order or what a step does
    (`config.RESUME_FIELDS`, the fields marked `resume`);
  * a SHA-256 of the saved arrays: orbax restores damaged bytes without noticing.
The data order needs no saving: the step gives the epoch and the batch within it, and
`input_pipeline.train_batches` draws an epoch's order from (seed, epoch).

orbax writes each checkpoint into a temporary folder and renames it once complete, so a run
killed while saving leaves the earlier checkpoints intact. With one process, the hashing and
orbax's own bookkeeping run on a thread of their own, so training goes on meanwhile.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
import sys
import tempfile
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from nin_jax.runtime import background, files
from nin_jax import input_pipeline, steps
from nin_jax.config import ADDED_OPTIONS, REMOVED_OPTIONS, RESUME_FIELDS, Config
from nin_jax.runtime.errors import WorkdirError

CHECKPOINT_DIR = "checkpoints"
METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax's, in each step's folder
VANISHED_RETRIES = 5  # reads of the then latest checkpoint, when the one being read was deleted meanwhile


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Where a run stands: its host train state, and the running train-metric sums and training
    seconds of the epoch it is in."""

    state: steps.TrainState
    epoch_totals: steps.Metrics
    epoch_seconds: float = 0.0

    @classmethod
    def start(cls, state: steps.TrainState) -> "Snapshot":
        return cls(state, steps.zero_metrics())

    def saved_arrays(self) -> dict[str, Any]:
        """The arrays to save. The step, an int in a fresh state, is always saved as an int32 array,
        so that the template a checkpoint is restored into has the saved dtypes."""
        state = serialization.to_state_dict(self.state)
        return {"train_state": {**state, "step": np.asarray(state["step"], np.int32)}, "epoch_totals": self.epoch_totals}


def _resume_record(config: Config) -> dict[str, Any]:
    """The fields a resumed run must share; an added option only where it is not at its default, so
    that the book's NiN writes the record that earlier versions wrote."""
    record = {name: getattr(config, name) for name in RESUME_FIELDS
              if name not in ADDED_OPTIONS or getattr(config, name) != ADDED_OPTIONS[name]}
    record["num_classes"] = input_pipeline.NUM_CLASSES
    if config.lr_schedule != "constant":  # the schedule's length is the run's length
        record["num_epochs"] = config.num_epochs
    return record


def _fingerprint(tree: Any) -> str:
    """SHA-256 over every array of `tree` with its path, dtype and shape."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        leaf = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def _make_writable(workdir: str) -> None:
    """Creates `workdir` and its checkpoint folder and writes a file there: better a clear message
    now than a failed save after an epoch of training."""
    try:
        files.own_folder(workdir, CHECKPOINT_DIR)
        tempfile.TemporaryFile(dir=os.path.join(workdir, CHECKPOINT_DIR)).close()
    except OSError as error:
        where = f"{error.filename}: " if error.filename and error.filename != workdir else ""
        raise WorkdirError(f"cannot write to --workdir {workdir}: {where}{error.strerror or error}") from error


# What the system says when a save cannot be written, as orbax and tensorstore pass it on.
SAVE_FAILURES = ("No space left on device", "Read-only file system", "Permission denied", "Not a directory",
                 "Disk quota exceeded", "File exists")


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _is_closed_loop_error(kind, value) -> bool:
    """After a save fails, orbax closes its event loop while tensorstore's writes still finish, and
    each one's callback reports, with a traceback, that the loop is closed: though the run's own
    line has said what failed."""
    return kind is RuntimeError and str(value) == "Event loop is closed"


def _without_closed_loop_errors(excepthook, unraisablehook):
    """sys.excepthook and sys.unraisablehook (tensorstore reports through both) that stay silent
    about `_is_closed_loop_error`."""
    def hook(kind, value, traceback):
        if not _is_closed_loop_error(kind, value):
            excepthook(kind, value, traceback)

    def unraisable(report):
        if not _is_closed_loop_error(report.exc_type, report.exc_value):
            unraisablehook(report)

    return hook, unraisable


def _vanishes(folder: str, seconds: float = 2.0) -> bool:
    """Whether `folder` is gone within `seconds`: orbax deletes a checkpoint file by file."""
    deadline = time.monotonic() + seconds
    while os.path.isdir(folder):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _step_folders(directory: str) -> list[int]:
    return [int(name) for name in os.listdir(directory) if name.isdigit()]


def _garbled_metadata(directory: str, step: int) -> bool:
    """Whether the step's orbax metadata is JSON that orbax cannot open: not an object, fields of
    the wrong types, or nested past Python's stack."""
    try:
        with files.open_regular(os.path.join(directory, str(step), METADATA_FILE)) as f:
            json.loads(f.read())
    except RecursionError:
        return True
    except (OSError, ValueError):  # missing or not JSON: orbax passes over such a file by itself
        return False
    try:
        ocp.metadata.get_step_metadata(os.path.join(directory, str(step)))
    except Exception:  # orbax's own kinds, ValueError mostly
        return True
    return False


# orbax's metadata files of a NiN checkpoint hold under 10 KB; one this large is not orbax's, and
# is refused before orbax reads it whole into memory.
MAX_METADATA_BYTES = 16 * 2**20


def _not_a_folder(path: str) -> str:
    """Why the checkpoint entry `path` is not a checkpoint's folder (a file, a FIFO, a link), or ''."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:  # deleted meanwhile by the run that writes it
        return ""
    return "" if stat.S_ISDIR(mode) else f"it is {files.kind(mode)}, not a checkpoint's folder"


def _damaged_file(folder: str) -> str:
    """What within the step's `folder` orbax must not open, or '': something other than a folder or
    a regular file (a FIFO would block its reader, a link lead elsewhere), or a metadata file larger
    than MAX_METADATA_BYTES directly in it or in one of its items' folders (the arrays' data lies
    further down)."""
    for inside, folders, names in os.walk(folder):
        shallow = os.path.dirname(os.path.relpath(inside, folder)) == ""
        for name in folders + names:
            try:
                status = os.lstat(os.path.join(inside, name))
            except FileNotFoundError:  # deleted meanwhile by the run that writes it
                return ""
            if not stat.S_ISDIR(status.st_mode) and not stat.S_ISREG(status.st_mode):
                return f"{name} is {files.kind(status.st_mode)}"
            if shallow and stat.S_ISREG(status.st_mode) and status.st_size > MAX_METADATA_BYTES:
                return f"{name} is {status.st_size:,} bytes, not orbax's"
    return ""


def _run_metadata_problem(run: Any) -> str:
    """What is wrong with the run item that `Checkpoints._save` writes, or '' when nothing is."""
    if not isinstance(run, dict):
        return f"the run's record is a JSON {type(run).__name__}, not an object"
    if not isinstance(run.get("config"), dict):
        return "the run's record has no config"
    if not isinstance(run.get("fingerprint"), str):
        return "the run's record has no checksum"
    seconds = run.get("epoch_seconds", 0.0)  # absent from checkpoints of earlier versions
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < float("inf"):
        return f"the run's record has epoch_seconds {seconds!r}"
    return ""


class Checkpoints:
    """The checkpoints of the run in `workdir`; saves are asynchronous, `close` waits for them."""

    def __init__(self, workdir: str, config: Config, read_only: bool = False):
        if not read_only:  # a reader (`nin_jax.predict`) may read a workdir on a read-only disk
            _make_writable(workdir)
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self._record = _resume_record(config)
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=not read_only,
                                               read_only=read_only)
        for step in _step_folders(self.directory) if os.path.isdir(self.directory) else ():
            entry = _not_a_folder(os.path.join(self.directory, str(step)))
            if entry:
                raise self._refusal(step, entry, "move it away to resume from the checkpoint before it")
            damaged = _damaged_file(os.path.join(self.directory, str(step)))
            if damaged:
                raise self._damaged(step, f"its files are incomplete or damaged ({damaged})")
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("arrays", "run"))
        except (ValueError, RecursionError) as error:  # orbax reads every checkpoint's metadata here, and fails on a garbled one
            garbled = [step for step in _step_folders(self.directory) if _garbled_metadata(self.directory, step)]
            if not garbled:
                raise
            raise self._damaged(max(garbled), f"its files are incomplete or damaged (reading them raised "
                                              f"{type(error).__name__})") from error
        # With several processes, orbax's save synchronises them with collectives on the devices,
        # which must come in the same order as the steps' own: so it runs on the loop's thread.
        self._saves = background.InOrder("checkpoints") if jax.process_count() == 1 else None
        self._hooks = sys.excepthook, sys.unraisablehook
        sys.excepthook, sys.unraisablehook = _without_closed_loop_errors(*self._hooks)
        self._last_step: Optional[int] = None  # of the latest save begun
        self._failure_told = False  # a failed save's error is raised once, not again by `close`

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self._saves:
                self._saves.close()
        finally:
            try:
                self._manager.close()  # waits for orbax's threads, and raises a failed save's error again
            except Exception as error:
                if not self._failure_told:
                    raise self._save_failed(self._last_step, error) from error
            finally:
                if not self._failure_told:  # after a failed save, tensorstore's callbacks may still come
                    sys.excepthook, sys.unraisablehook = self._hooks

    def save(self, snapshot: Snapshot) -> None:
        """Starts saving in the background; `snapshot` must hold host copies, which the next
        steps cannot change."""
        if self._saves:
            self._saves.submit(self._save, snapshot)
        else:
            self._save(snapshot)

    def check(self) -> None:
        """Raises the WorkdirError of a save that failed in the background (a full disk, say),
        without waiting: the loop calls it after every step, so a run never trains on unsaved."""
        if self._saves:
            self._saves.raise_failed()

    def kept(self) -> str:
        """Which checkpoint a process that ends now leaves to resume from: the latest whole one
        (orbax names a checkpoint's folder by its step only once the checkpoint is complete)."""
        saved = _step_folders(self.directory)
        if not saved:
            return f"no checkpoint was saved yet in {self.directory}"
        return f"the checkpoint of step {max(saved)} in {self.directory} is kept; run the same command to resume from it"

    def _save(self, snapshot: Snapshot) -> None:
        arrays = snapshot.saved_arrays()
        run = {"config": self._record, "epoch_seconds": snapshot.epoch_seconds, "fingerprint": _fingerprint(arrays)}
        step = int(snapshot.state.step)
        self._last_step = step
        try:
            self._manager.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                             run=ocp.args.JsonSave(run)))
            if self._saves:  # on the saving thread: the job ends when the checkpoint is whole
                self._manager.wait_until_finished()
        except Exception as error:  # orbax and tensorstore wrap the system's error in their own kinds
            self._failure_told = True
            raise self._save_failed(step, error) from error

    def _save_failed(self, step: int, error: Exception) -> WorkdirError:
        text = " ".join(f"{type(e).__name__}: {e}" for e in _causes(error))
        reason = next((known for known in SAVE_FAILURES if known.lower() in text.lower()), text.splitlines()[0][:200])
        kept = [s for s in self._manager.all_steps() if s != step]
        last = f"the checkpoint of step {max(kept)} is whole" if kept else "no checkpoint was saved before it"
        return WorkdirError(f"cannot save the checkpoint of step {step} in {self.directory}: {reason}; {last}. "
                            f"Make room or fix the folder, then run the same command to resume")

    def restore_latest(self, initial_state: steps.TrainState) -> Optional[Snapshot]:
        """The latest checkpoint's snapshot, None when there is none. Refuses, and leaves the
        checkpoint as it is, when it is unreadable, damaged or from an incompatible config.

        A run that is training in this workdir may delete its oldest checkpoints while another
        process (`nin_jax.predict`) reads one: a checkpoint that vanished while it was read is not
        damaged, and the then latest one is read instead."""
        for _ in range(VANISHED_RETRIES):
            step = self._manager.latest_step()
            if step is None:
                return None
            try:
                return self._restore_step(step, initial_state)
            except WorkdirError:
                if not _vanishes(os.path.join(self.directory, str(step))):
                    raise
            with contextlib.suppress(FileNotFoundError):  # orbax lists, then stats each: one went between
                self._manager.reload()
        raise WorkdirError(f"the checkpoints in {self.directory} were deleted faster than they could be read "
                           f"({VANISHED_RETRIES} tries); try again once the run that writes them has finished")

    def _restore_step(self, step: int, initial_state: steps.TrainState) -> Snapshot:
        run = self._restore(step, run=ocp.args.JsonRestore())["run"]
        problem = _run_metadata_problem(run)
        if problem:
            raise self._damaged(step, f"its files are incomplete or damaged ({problem})")
        self._check_compatible(step, run.get("config", {}))
        template = Snapshot.start(initial_state).saved_arrays()
        arrays = self._restore(step, arrays=ocp.args.StandardRestore(template))["arrays"]
        if _fingerprint(arrays) != run.get("fingerprint"):
            raise self._damaged(step, "its arrays do not match the checksum saved with them")
        state = serialization.from_state_dict(initial_state, {**serialization.to_state_dict(initial_state),
                                                              **arrays["train_state"]})
        return Snapshot(state, arrays["epoch_totals"], run.get("epoch_seconds", 0.0))

    def _restore(self, step: int, **items) -> Any:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # orbax, tensorstore and json each raise their own kinds
            raise self._damaged(step, f"its files are incomplete or damaged (reading them raised {type(error).__name__})") from error

    def _check_compatible(self, step: int, saved: dict[str, Any]) -> None:
        removed = {name: off for name, off in REMOVED_OPTIONS.items() if name in saved}
        saved = {**ADDED_OPTIONS, **saved}  # a record without an added option: a run at its default
        differences = [f"{name} {saved.get(name)} (this run: {value})"
                       for name, value in {**ADDED_OPTIONS, **self._record, **removed}.items() if saved.get(name) != value]
        if differences:
            raise self._refusal(step, f"it comes from a run with {', '.join(differences)}", "rerun with that run's flags")

    def _damaged(self, step: int, reason: str) -> WorkdirError:
        return self._refusal(step, reason, "move that folder away to resume from the checkpoint before it")

    def _refusal(self, step: int, reason: str, advice: str) -> WorkdirError:
        return WorkdirError(
            f"refusing to resume from the checkpoint {os.path.join(self.directory, str(step))}: {reason}; "
            f"{advice}, or use another --workdir. The checkpoint was left as it is."
        )
