"""Checkpoints (nin_jax/run/checkpoints.py): a bitwise round trip, refusals that leave the
checkpoint as it was, crafted metadata called damaged in one line, a save that finds no room
ending the run in one line, and a workdir read while its run deletes old checkpoints."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Optional

import jax
import numpy as np
import pytest
from flax import serialization

from nin_jax import steps
from nin_jax.run.checkpoints import Checkpoints, Snapshot, WorkdirError
from nin_jax.config import ADDED_OPTIONS, Config

from conftest import (ABSURD_SIZE, CPU_ENV, HELPER, SAVE_BOUND_S, fake_run, make_special_file, mounted_tmpfs,
                      returns_within, saved_steps)


CONFIG = Config(resize=67, batch_size=8, keep_checkpoints=2)


@pytest.fixture(scope="module")
def initial_state() -> steps.TrainState:
    return jax.device_get(steps.create_train_state(CONFIG))


def snapshot_at(state: steps.TrainState, step: int) -> Snapshot:
    """A state that differs from the initial one in every array."""
    moved = state.replace(step=step, params=jax.tree_util.tree_map(lambda p: p + step, state.params),
                          dropout_key=state.dropout_key + step)
    totals = {name: np.asarray(step * 1.5, np.float32) for name in steps.zero_metrics()}
    return Snapshot(moved, totals, epoch_seconds=step / 3)


def save(workdir, config: Config, *snapshots: Snapshot) -> None:
    with Checkpoints(str(workdir), config) as checkpoints:
        for snapshot in snapshots:
            checkpoints.save(snapshot)


def restore(workdir, config: Config, initial_state: steps.TrainState) -> Optional[Snapshot]:
    with Checkpoints(str(workdir), config) as checkpoints:
        return checkpoints.restore_latest(initial_state)


def assert_same(a: Snapshot, b: Snapshot) -> None:
    jax.tree_util.tree_map(np.testing.assert_array_equal, serialization.to_state_dict(a.state),
                           serialization.to_state_dict(b.state))
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.epoch_totals, b.epoch_totals)
    assert a.epoch_seconds == b.epoch_seconds


def files_of(workdir) -> dict[str, bytes]:
    files = {}
    for folder, _, names in os.walk(workdir):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                files[os.path.join(folder, name)] = f.read()
    return files


def test_restores_the_latest_checkpoint_bit_for_bit_and_keeps_the_last_few(tmp_path, initial_state):
    saved = [snapshot_at(initial_state, step) for step in (3, 4, 5)]
    save(tmp_path, CONFIG, *saved)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "5"]  # keep_checkpoints=2
    # Flags that change neither shapes nor data order may differ on resume.
    config = dataclasses.replace(CONFIG, num_epochs=20, eval_examples=100, parallel="pmap", keep_checkpoints=5)
    assert_same(restore(tmp_path, config, initial_state), saved[-1])


def test_a_checkpoint_deleted_while_the_checkpoints_are_listed_again_is_passed_over(tmp_path, initial_state, monkeypatch):
    """A run deletes its oldest checkpoints as predict reads: orbax's listing stats each folder it
    found, and one may go in between (seen in a test run: a FileNotFoundError traceback)."""
    saved = [snapshot_at(initial_state, step) for step in (3, 4, 5)]
    save(tmp_path, CONFIG, *saved)
    with Checkpoints(str(tmp_path), CONFIG) as checkpoints:
        shutil.rmtree(tmp_path / "checkpoints" / "5")  # after the listing: the latest is gone
        reload, calls = checkpoints._manager.reload, []

        def reload_raced_once():
            calls.append(1)
            if len(calls) == 1:
                raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "checkpoints" / "5"))
            reload()

        monkeypatch.setattr(checkpoints._manager, "reload", reload_raced_once)
        assert_same(checkpoints.restore_latest(initial_state), saved[1])
    assert len(calls) == 2


def test_an_empty_workdir_has_nothing_to_resume(tmp_path, initial_state):
    assert restore(tmp_path / "new", CONFIG, initial_state) is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"resize": 96}, "it comes from a run with resize 67 (this run: 96)"),
        ({"dtype": "bfloat16", "seed": 1}, "dtype float32 (this run: bfloat16), seed 0 (this run: 1)"),
        ({"batch_size": 16}, "batch_size 8 (this run: 16)"),
        ({"head": "max"}, "head avg (this run: max)"),  # an exercise's variant: a record without it is the book's
    ],
)
def test_refuses_a_checkpoint_of_another_configuration(tmp_path, initial_state, change, message):
    save(tmp_path, CONFIG, snapshot_at(initial_state, 3))
    before = files_of(tmp_path)
    with pytest.raises(WorkdirError, match="refusing to resume from the checkpoint .*checkpoints/3: ") as error:
        restore(tmp_path, dataclasses.replace(CONFIG, **change), initial_state)
    assert message in str(error.value) and "The checkpoint was left as it is." in str(error.value)
    assert files_of(tmp_path) == before


def test_the_exercises_options_enter_the_record_only_off_the_book_s_defaults(tmp_path, initial_state):
    """The book's NiN writes the record that earlier versions wrote, without the options added since
    (tests/run/test_checkpoints_of_earlier_versions.py holds it against theirs); a variant's record
    names its option, and the book's NiN refuses to resume it."""
    variant = dataclasses.replace(CONFIG, head="max", inner_convs=2)  # inner_convs at its default
    save(tmp_path / "book", CONFIG, snapshot_at(initial_state, 3))
    save(tmp_path / "variant", variant, snapshot_at(initial_state, 3))
    records = {name: json.loads((tmp_path / name / "checkpoints" / "3" / "run" / "metadata").read_text())["config"]
               for name in ("book", "variant")}
    assert not set(ADDED_OPTIONS) & set(records["book"])
    assert {name: records["variant"][name] for name in ADDED_OPTIONS if name in records["variant"]} == {"head": "max"}
    with pytest.raises(WorkdirError, match=r"it comes from a run with head max \(this run: avg\)"):
        restore(tmp_path / "variant", CONFIG, initial_state)


def swap_in_the_arrays_of_another_checkpoint(step_dir: str, other_step_dir: str) -> None:
    """Readable arrays that are not the ones saved: orbax itself would restore them."""
    shutil.rmtree(os.path.join(step_dir, "arrays"))
    shutil.copytree(os.path.join(other_step_dir, "arrays"), os.path.join(step_dir, "arrays"))


def delete_the_arrays(step_dir: str, other_step_dir: str) -> None:
    shutil.rmtree(os.path.join(step_dir, "arrays"))


def garble_the_run_record(step_dir: str, other_step_dir: str) -> None:
    with open(os.path.join(step_dir, "run", "metadata"), "w") as f:
        f.write("{garbled")


def garble_the_step_metadata(step_dir: str, other_step_dir: str) -> None:
    """JSON that is not an object: orbax fails on it as it opens the folder of checkpoints."""
    with open(os.path.join(step_dir, "_CHECKPOINT_METADATA"), "w") as f:
        f.write("[]")


# (Truncated array files are refused alike, but tensorstore then leaves an asyncio callback behind
# that pytest reports as an unraisable exception in a later test.)
@pytest.mark.parametrize(
    "damage, message",
    [
        (swap_in_the_arrays_of_another_checkpoint, "its arrays do not match the checksum saved with them"),
        (delete_the_arrays, "its files are incomplete or damaged (reading them raised KeyError)"),
        (garble_the_run_record, "its files are incomplete or damaged (reading them raised JSONDecodeError)"),
        (garble_the_step_metadata, "its files are incomplete or damaged (reading them raised ValueError)"),
    ],
)
def test_refuses_a_damaged_checkpoint(tmp_path, initial_state, damage, message):
    workdir, other_workdir = tmp_path / "run", tmp_path / "other"
    save(workdir, CONFIG, snapshot_at(initial_state, 3))
    save(other_workdir, CONFIG, snapshot_at(initial_state, 4))
    damage(str(workdir / "checkpoints" / "3"), str(other_workdir / "checkpoints" / "4"))
    before = files_of(workdir)
    with pytest.raises(WorkdirError) as error:
        restore(workdir, CONFIG, initial_state)
    assert message in str(error.value) and "move that folder away" in str(error.value)
    assert len(str(error.value).splitlines()) == 1
    assert files_of(workdir) == before


def test_a_workdir_that_cannot_be_written_is_refused_at_once(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(WorkdirError, match=f"cannot write to --workdir {tmp_path}/file/run: Not a directory"):
        Checkpoints(str(tmp_path / "file" / "run"), CONFIG)


def plain_file(path) -> None:
    path.write_text("not a checkpoint")


def dangling_link(path) -> None:
    path.symlink_to(path.parent / "gone")


@pytest.mark.parametrize("entry, kind", [(plain_file, "a regular file"), (dangling_link, "a symbolic link"),
                                         (lambda path: make_special_file(path, "fifo"), "a FIFO")])
@pytest.mark.parametrize("read_only", [False, True])  # train, or predict and export
def test_a_checkpoint_folder_that_is_not_a_folder_is_called_damaged_in_one_line(tmp_path, initial_state, entry, kind,
                                                                                 read_only):
    save(tmp_path, CONFIG, snapshot_at(initial_state, 3))
    entry(tmp_path / "checkpoints" / "5")
    with pytest.raises(WorkdirError) as refusal:
        with Checkpoints(str(tmp_path), CONFIG, read_only=read_only) as checkpoints:
            checkpoints.restore_latest(initial_state)
    assert str(refusal.value) == (
        f"refusing to resume from the checkpoint {tmp_path / 'checkpoints' / '5'}: it is {kind}, not a checkpoint's "
        f"folder; move it away to resume from the checkpoint before it, or use another --workdir. The checkpoint was "
        f"left as it is.")


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_a_checkpoint_file_that_is_not_a_regular_file_is_called_damaged_without_opening_it(tmp_path, initial_state,
                                                                                          kind):
    save(tmp_path, CONFIG, snapshot_at(initial_state, 3))
    metadata = tmp_path / "checkpoints" / "3" / "_CHECKPOINT_METADATA"
    metadata.unlink()
    make_special_file(metadata, kind)
    with pytest.raises(WorkdirError) as refusal:
        returns_within(lambda: restore(tmp_path, CONFIG, initial_state))
    assert "checkpoints/3: its files are incomplete or damaged (_CHECKPOINT_METADATA is a " in str(refusal.value)


def test_a_checkpoint_folder_that_is_a_link_leading_out_of_the_workdir_is_refused_before_anything_is_written(
        tmp_path, initial_state):
    workdir, outside = tmp_path / "run", tmp_path / "outside"
    workdir.mkdir()
    outside.mkdir()
    (workdir / "checkpoints").symlink_to(outside)
    with pytest.raises(WorkdirError) as refusal:
        save(workdir, CONFIG, snapshot_at(initial_state, 3))
    assert str(refusal.value) == (f"cannot write to --workdir {workdir}: {workdir / 'checkpoints'}: Is a link that "
                                  f"leads outside {workdir} (to {outside}), which nin_jax never writes through")
    assert os.listdir(outside) == []


RUN_METADATA = "checkpoints/2/run/metadata"
STEP_METADATA = "checkpoints/2/_CHECKPOINT_METADATA"


@pytest.mark.parametrize("path, craft", [
    (RUN_METADATA, lambda run: [1]),
    (RUN_METADATA, lambda run: {**run, "config": [1]}),
    (RUN_METADATA, lambda run: {key: value for key, value in run.items() if key != "config"}),
    (RUN_METADATA, lambda run: {**run, "epoch_seconds": "x"}),
    (RUN_METADATA, lambda run: {**run, "epoch_seconds": -1}),
    (RUN_METADATA, lambda run: {**run, "fingerprint": 3}),
    (STEP_METADATA, lambda meta: {**meta, "init_timestamp_nsecs": "x"}),
    (STEP_METADATA, lambda meta: {**meta, "item_handlers": [1]}),
    (STEP_METADATA, lambda meta: {**meta, "metrics": [1]}),
    (STEP_METADATA, lambda meta: "[" * 100_000 + "]" * 100_000),
    (STEP_METADATA, None),  # absurd size
])
def test_crafted_checkpoint_metadata_is_called_damaged_in_one_line(finished_run, tmp_path, path, craft):
    """Wrong types, missing keys, absurd nesting or size in a checkpoint's metadata: the resume is
    refused in one line, never a traceback, never a resume with a made-up config."""
    import json
    import shutil

    from nin_jax import steps
    from nin_jax.run.checkpoints import Checkpoints
    from nin_jax.runtime.errors import WorkdirError
    from nin_jax.run.outputs import read_config

    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    if craft is None:
        with open(workdir / path, "wb") as f:
            f.truncate(ABSURD_SIZE)
    else:
        crafted = craft(json.loads((workdir / path).read_text()))
        (workdir / path).write_text(crafted if isinstance(crafted, str) else json.dumps(crafted))
    config = read_config(str(workdir))
    with pytest.raises(WorkdirError) as refusal:
        with Checkpoints(str(workdir), config, read_only=True) as checkpoints:
            checkpoints.restore_latest(steps.create_train_state(config, steps_per_epoch=2))
    assert str(refusal.value).startswith(f"refusing to resume from the checkpoint {workdir / 'checkpoints' / '2'}: "
                                         f"its files are incomplete or damaged ("), str(refusal.value)


# ---------------------------------------------------------------------------------------------
# Saves that cannot be written, and a workdir that another process reads while the run trains.


SMALL_RUN = ["--resize=67", "--batch_size=32", "--num_epochs=2", "--eval_examples=32", "--parallel=jit",
             "--checkpoint_every_steps=2"]  # 8 steps an epoch on 256 examples


def test_a_file_where_the_checkpoints_go_ends_the_run_before_training_in_one_line(tmp_path):
    (tmp_path / "checkpoints").write_text("in the way")
    start = time.monotonic()
    result = fake_run(*SMALL_RUN, f"--workdir={tmp_path}", examples=256, text=True, timeout=SAVE_BOUND_S)
    assert time.monotonic() - start < SAVE_BOUND_S
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"fake_data_train.py: error: cannot write to --workdir {tmp_path}: "
                             f"{tmp_path / 'checkpoints'}: File exists\n")
    assert (tmp_path / "checkpoints").read_text() == "in the way"


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB filesystem: room for two of NiN's 8 MB checkpoints, not three."""
    with mounted_tmpfs(tmp_path / "disk", "20M") as disk:
        yield disk


def test_a_save_that_fails_on_a_full_disk_ends_the_run_in_one_line_and_the_same_command_resumes(small_disk):
    workdir = small_disk / "run"
    start = time.monotonic()
    result = fake_run(*SMALL_RUN, f"--workdir={workdir}", examples=256, text=True, timeout=SAVE_BOUND_S)
    assert time.monotonic() - start < SAVE_BOUND_S  # exited by itself: no thread left waiting on the dead save
    assert result.returncode == 1, result.stderr
    match = re.fullmatch(rf"fake_data_train.py: error: cannot save the checkpoint of step (\d+) in "
                         rf"{re.escape(str(workdir / 'checkpoints'))}: No space left on device; the checkpoint of "
                         rf"step (\d+) is whole. Make room or fix the folder, then run the same command to resume\n",
                         result.stderr)
    assert match, result.stderr
    failed, whole = int(match[1]), int(match[2])
    assert whole in saved_steps(workdir) and failed not in saved_steps(workdir)

    subprocess.run(["mount", "-o", "remount,size=100M", str(small_disk)], check=True)
    result = fake_run(*SMALL_RUN, f"--workdir={workdir}", examples=256, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"resuming from the checkpoint of step {whole} "), result.stdout
    assert "epoch 2/2" in result.stdout


def test_predict_reads_a_live_workdir_whose_run_deletes_old_checkpoints_and_never_calls_them_damaged(tmp_path):
    workdir = tmp_path / "run"
    flags = ["--resize=67", "--batch_size=8", "--num_epochs=50", "--eval_examples=8", "--parallel=jit",
             "--checkpoint_every_steps=1", "--keep_checkpoints=2", f"--workdir={workdir}"]
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        training = subprocess.Popen([sys.executable, HELPER, "64",
                                     *flags], stdout=out, stderr=subprocess.STDOUT, env=CPU_ENV)
    try:
        deadline = time.monotonic() + 120
        while len(saved_steps(workdir)) < 2:
            assert training.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        for _ in range(2):
            result = fake_run("predict", f"--workdir={workdir}", examples=256, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            assert "accuracy on 256 test images" in result.stdout
        assert training.poll() is None, "the run should still be training, deleting checkpoints as it goes"
    finally:
        training.kill()
        training.wait()
