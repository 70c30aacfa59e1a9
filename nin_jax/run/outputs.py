"""What a run tells its user after each epoch and leaves behind in its workdir: the book's line per
epoch (`epoch_line`); metrics.jsonl and config.json, which later tools read
(`python -m nin_jax.predict`); curves.png and TensorBoard events (`EpochOutputs`, written off the
training thread). `tensorboard --logdir <workdir>` shows the run; the scalars' step is the epoch,
as on curves.png. Progress within an epoch is `progress.py`'s.
"""

import dataclasses
import importlib
import json
import os
import secrets
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Optional

from nin_jax.config import REMOVED_OPTIONS, Config, ConfigError
from nin_jax.run import profiling
from nin_jax.runtime import background, distributed, files
from nin_jax.runtime.errors import WorkdirError

# The per-epoch line, metrics.jsonl and config.json.

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def epoch_line(record: dict[str, Any], num_epochs: int) -> str:
    """The book's `train_ch6` summary for one epoch, e.g.
    'epoch 3/10: loss 0.563, train acc 0.786, test acc 0.790, 3087.6 images/s on 2 cpu devices'. The
    record keeps the rate under `examples_per_sec`, the key of metrics.jsonl since its first version."""
    return (
        f"epoch {record['epoch']}/{num_epochs}: loss {record['train_loss']:.3f}, "
        f"train acc {record['train_accuracy']:.3f}, test acc {record['test_accuracy']:.3f}, "
        f"{record['examples_per_sec']:.1f} images/s on {record['devices']}"
    )


def epoch_record(epoch: int, train: dict[str, Any], train_seconds: float, test: dict[str, float],
                 learning_rate: float, compile_seconds: float, devices: str, parallel_name: str) -> dict[str, Any]:
    """One line of metrics.jsonl, from the epoch's summed train metrics (host values) and its test
    results; `learning_rate` is that of the epoch's last step."""
    return {
        "epoch": epoch,
        "train_loss": float(train["loss_sum"] / train["count"]),
        "train_accuracy": float(train["correct"] / train["count"]),
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "train_examples": int(train["count"]),
        "test_examples": test["examples"],
        "learning_rate": learning_rate,
        "examples_per_sec": float(train["count"]) / train_seconds,
        "train_seconds": train_seconds,
        "compile_seconds": compile_seconds,
        "devices": devices,
        "parallel": parallel_name,
    }


# Larger files are not this project's: refused in one line rather than read into memory.
MAX_METRICS_BYTES = 64 * 2**20  # 150,000 epochs' records
MAX_CONFIG_BYTES = 2**20  # config.json is about 1.5 KB


def _is_epoch_record(record: Any) -> bool:
    """Whether `record` is an epoch's line as far as its readers go: an epoch number from 1, and
    every value that TensorBoard and the curves read, as a number."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    return (isinstance(record, dict) and number(record.get("epoch")) and isinstance(record["epoch"], int)
            and record["epoch"] >= 1 and all(number(record.get(key)) for key in SCALARS.values()))


def _metric_lines(workdir: str, warn: Callable[[str], None] = lambda line: None) -> list[tuple[str, dict[str, Any]]]:
    """The lines of metrics.jsonl with their records. A line that is not a whole record (the torn
    end of a write that a crash cut short, on a filesystem whose writes are not atomic, or a line
    edited by hand) is left out, and `warn` is told. The loop writes ASCII JSON, one object a line."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    size = os.path.getsize(path)
    if size > MAX_METRICS_BYTES:
        raise WorkdirError(f"{path} is {size:,} bytes, more than the records of {MAX_METRICS_BYTES // 440:,} epochs: "
                           f"not written by train.py; move it away and run again")
    lines = []
    try:
        file = files.open_regular(path)
    except OSError as error:
        raise WorkdirError(f"cannot read {path}: {error.strerror or error}; move it away and run again") from error
    with file as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("ascii")
                record = json.loads(line) if line.strip() else None
            except (ValueError, RecursionError):  # not ASCII, not JSON, or nested past Python's stack
                record = {}
            if record is None:
                continue
            if not _is_epoch_record(record):
                warn(f"warning: {path} line {number} is not a whole epoch record; left out")
                continue
            lines.append((line if line.endswith("\n") else line + "\n", record))
    return lines


def append_metrics(workdir: Optional[str], record: dict[str, Any]) -> None:
    """Adds one JSON object per epoch to <workdir>/metrics.jsonl, rewriting the file whole."""
    if workdir:
        kept = "".join(line for line, _ in _metric_lines(workdir))
        files.write_text(os.path.join(workdir, METRICS_FILE), kept + json.dumps(record) + "\n")


def keep_epochs(workdir: str, num_epochs: int, warn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Drops the records of epochs after `num_epochs` from metrics.jsonl and returns the rest. A
    resumed run calls it with its checkpoint's finished epochs: the later ones run again and would
    otherwise be logged twice. The kept lines stay byte for byte as they were."""
    lines = [(line, record) for line, record in _metric_lines(workdir, warn) if record["epoch"] <= num_epochs]
    if os.path.exists(os.path.join(workdir, METRICS_FILE)):
        files.write_text(os.path.join(workdir, METRICS_FILE), "".join(line for line, _ in lines))
    return [record for _, record in lines]


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    return [record for _, record in _metric_lines(workdir)]


def write_config(workdir: Optional[str], config: Config) -> None:
    """Writes <workdir>/config.json: every Config field, as the flags of train.py name them."""
    if workdir:
        files.write_text(os.path.join(workdir, CONFIG_FILE), json.dumps(dataclasses.asdict(config), indent=2))


def read_config(workdir: str) -> Config:
    """The Config that <workdir>/config.json records; options of earlier versions are left out (the
    checkpoint says whether the run had them on). A file that is not what train.py writes (too
    large, not a JSON object, fields of the wrong type or value) is refused in one line."""
    path = os.path.join(workdir, CONFIG_FILE)

    def refused(reason: str) -> WorkdirError:
        return WorkdirError(f"cannot read the run's flags from {path} ({reason}); it was not written by this "
                            f"version's train.py")

    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise refused(f"it is {size:,} bytes, more than any config.json")
        with files.open_regular(path) as f:
            fields = json.loads(f.read())
        if not isinstance(fields, dict):
            raise refused(f"it holds a JSON {type(fields).__name__}, not an object")
        return Config(**{name: value for name, value in fields.items() if name not in REMOVED_OPTIONS}).validate()
    except ConfigError as error:  # a field of the wrong type or value
        raise refused(str(error)) from error
    except files.NotRegularFile as error:  # a FIFO, a socket, a device: never opened
        raise WorkdirError(f"cannot read the run's flags from {path} ({error.strerror}); put the config.json that "
                           f"train.py wrote there") from error
    except (OSError, ValueError, TypeError, RecursionError) as error:  # unreadable, not JSON, fields this version lacks
        raise refused(f"{type(error).__name__}: {error}") from error


def check_outputs(workdir: str, profile_steps: int) -> None:
    """Raises WorkdirError now when process 0 could not write its files in the workdir during the
    run (a folder, FIFO, socket or device where metrics.jsonl or curves.png goes, a file where the
    profile goes or a link there leading out of the workdir, a workdir that takes no new file,
    where the TensorBoard events and each file's temporary twin go), as
    `Checkpoints` does for its folder: before training, not after an epoch. With several
    processes, all of them learn process 0's finding and stop together."""
    refusal = ""
    if distributed.is_main_process():
        try:
            for name in (METRICS_FILE, CONFIG_FILE, CURVES_FILE):
                files.check_regular(os.path.join(workdir, name), follow_symlinks=False)
            if profile_steps:
                files.own_folder(workdir, *profiling.TRACE_FOLDERS)
            tempfile.TemporaryFile(dir=workdir).close()
        except OSError as error:
            refusal = f"cannot write to --workdir {workdir}: {error.filename}: {error.strerror or error}"
    refusal = distributed.from_process_0("outputs", refusal)
    if refusal:
        raise WorkdirError(refusal)


# curves.png and TensorBoard events.

CURVES_FILE = "curves.png"
REDRAW_EVERY_SECONDS = 10.0
# TensorBoard tag -> epoch record key.
SCALARS = {
    "train/loss": "train_loss",
    "train/accuracy": "train_accuracy",
    "train/images_per_sec": "examples_per_sec",
    "test/loss": "test_loss",
    "test/accuracy": "test_accuracy",
    "train/learning_rate": "learning_rate",
}


class ScalarEvents:
    """TensorBoard scalars in an event file of `logdir`, written with the `tensorboard` package's
    record writer. Its EventFileWriter opens files through `tensorboard.compat.tf`, which imports
    TensorFlow where it is installed (seconds); a plain file needs none. Each value is the float32
    'scalars' tensor summary that `tf.summary.scalar` would write."""

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.record_writer import RecordWriter

        # TensorBoard finds event files by this name. Its random end keeps two writers apart and
        # makes it a name no one can plant a link at; "x" (O_EXCL) never opens one anyway.
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{secrets.token_hex(4)}"
        self._records = RecordWriter(open(os.path.join(logdir, name), "xb"))
        self._add(file_version="brain.Event:2")

    def write(self, values: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.scalar import summary_v2

        summary = summary_pb2.Summary(value=[summary_v2.scalar_pb(tag, value).value[0] for tag, value in values.items()])
        self._add(step=step, summary=summary)

    def _add(self, **fields) -> None:
        from tensorboard.compat.proto import event_pb2

        self._records.write(event_pb2.Event(wall_time=time.time(), **fields).SerializeToString())
        self._records.flush()

    def close(self) -> None:
        self._records.close()


def _scalar_events(workdir: str) -> Optional[ScalarEvents]:
    """The workdir's event writer, or None where the `tensorboard` package is not installed."""
    try:
        return ScalarEvents(workdir)
    except ImportError:
        return None


class EpochOutputs:
    """Call `write(records)` after every epoch and `close()` after the last, which waits for the
    files; without a workdir both do nothing. Without the `tensorboard` package, the TensorBoard
    events are left out.

    The files are written on a thread of their own, so the next epoch starts at once. Every
    epoch's scalars reach TensorBoard; curves.png, which takes far longer to draw, is redrawn at
    most every `REDRAW_EVERY_SECONDS` during the run and always at its end.
    """

    def __init__(self, workdir: Optional[str], config: Config):
        self._workdir = workdir
        self._config = config
        self._events = _scalar_events(workdir) if workdir else None
        self._jobs = background.InOrder("epoch_outputs")
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._written = self._drawn = 0  # epochs sent to TensorBoard, epochs on curves.png
        # The first redraw waits REDRAW_EVERY_SECONDS too: on a fast device the epochs of its first
        # seconds run without a drawing beside them, and matplotlib is imported before training.
        self._last_drawn = time.monotonic()
        if workdir:
            self._jobs.submit(importlib.import_module, "nin_jax.run.plots")

    def write(self, records: list[dict[str, Any]]) -> None:
        """Starts writing the epochs that the files lack; `records` holds every epoch so far."""
        if not self._workdir:
            return
        with self._lock:
            self._records = list(records)
        if self._jobs.idle:  # else the job under way catches up, or the next one does
            self._jobs.submit(self._catch_up, False)

    def _catch_up(self, final: bool) -> None:
        with self._lock:
            records = self._records
        if self._events and self._written < len(records):
            for record in records[self._written:]:
                self._events.write({tag: record[key] for tag, key in SCALARS.items()}, record["epoch"])
            self._written = len(records)
        due = final or time.monotonic() - self._last_drawn >= REDRAW_EVERY_SECONDS
        if due and self._drawn < len(records):
            from nin_jax.run import plots  # matplotlib, imported before training by __init__

            self._last_drawn = time.monotonic()
            plots.plot_curves(records, self._config.num_epochs, os.path.join(self._workdir, CURVES_FILE))
            self._drawn = len(records)

    def close(self) -> None:
        try:
            if self._workdir:
                self._jobs.submit(self._catch_up, True)
            self._jobs.close()
        finally:
            if self._events:
                self._events.close()
