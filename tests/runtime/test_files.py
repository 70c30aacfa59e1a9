"""Files (nin_jax/runtime/files.py): every file is written whole, honours the user's umask, and is
never written through a link planted at its name."""

import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from nin_jax.run import outputs
from nin_jax.runtime import files
from nin_jax.runtime.errors import OutputError

from conftest import PRECIOUS, REPO_ROOT, SPECIAL_FILES, make_special_file, random_arrays, returns_within


def test_the_tensorboard_events_are_never_written_through_a_link_planted_at_their_name(tmp_path, precious):
    workdir = tmp_path / "run"
    workdir.mkdir()
    now = int(time.time())
    for second in range(now, now + 5):  # the name the file would get in the next seconds, before it was unguessable
        (workdir / f"events.out.tfevents.{second:010d}.{socket.gethostname()}.{os.getpid()}").symlink_to(precious)
    events = outputs.ScalarEvents(str(workdir))
    events.write({"train/loss": 1.0}, step=1)
    events.close()
    assert precious.read_text() == PRECIOUS
    (written,) = [path for path in workdir.iterdir() if not path.is_symlink()]
    assert written.name.startswith("events.out.tfevents.") and written.stat().st_size > 0


@pytest.mark.parametrize("umask", [0o077, 0o002])
def test_files_written_whole_get_the_mode_that_open_gives_under_the_umask(tmp_path, umask):
    before = os.umask(umask)
    try:
        files.write_text(str(tmp_path / "config.json"), "{}")
        with open(tmp_path / "opened.json", "w"):
            pass
    finally:
        os.umask(before)
    assert stat.S_IMODE(os.stat(tmp_path / "config.json").st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "opened.json").st_mode) == 0o666 & ~umask


def _under_umask_077(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          preexec_fn=lambda: os.umask(0o077), env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow  # three processes: train, export, predict
def test_under_umask_077_no_file_or_folder_of_a_run_its_model_or_its_pictures_is_open_to_others(tmp_path):
    workdir, data, model = tmp_path / "run", tmp_path / "arrays.npz", tmp_path / "nin.jax_exported"
    random_arrays(data, 16, 8)
    train = _under_umask_077("train.py", "--data_arrays", str(data), "--resize", "67", "--batch_size", "8",
                             "--num_epochs", "1", "--compile_cache", "off", "--workdir", str(workdir))
    assert train.returncode == 0, train.stderr
    export = _under_umask_077("-m", "nin_jax.export", "--workdir", str(workdir), "--out", str(model))
    assert export.returncode == 0, export.stderr
    predict = _under_umask_077("-m", "nin_jax.predict", "--workdir", str(workdir), "--num_images", "4")
    assert predict.returncode == 0, predict.stderr
    written = [model, workdir, *workdir.rglob("*")]  # files and folders, ours, orbax's, TensorBoard's
    assert {"config.json", "metrics.jsonl", "curves.png", "predictions.png", "checkpoints"} <= {
        path.name for path in written}
    open_to_others = {str(path): oct(stat.S_IMODE(path.stat().st_mode)) for path in written
                      if path.stat().st_mode & 0o077}
    assert not open_to_others


@pytest.mark.parametrize("kind", SPECIAL_FILES)
def test_no_writer_replaces_or_opens_what_is_not_a_regular_file(tmp_path, kind):
    """`--out /dev/null` had replaced the system's /dev/null with the exported model."""
    target = tmp_path / "target"
    make_special_file(target, kind)
    before = os.lstat(target)
    for write in (lambda: files.check_writable(str(target)), lambda: files.write_text(str(target), "x")):
        with pytest.raises(OutputError) as refusal:
            returns_within(write)
        assert str(refusal.value) == f"cannot write {target}: {SPECIAL_FILES[kind]}"
    after = os.lstat(target)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)
    assert os.listdir(tmp_path) == ["target"]  # no temporary left


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_a_file_the_project_reads_is_refused_without_opening_it_when_it_is_not_a_regular_file(tmp_path, kind):
    make_special_file(tmp_path / "target", kind)
    with pytest.raises(files.NotRegularFile) as refusal:
        returns_within(lambda: files.open_regular(str(tmp_path / "target")))
    assert refusal.value.strerror == SPECIAL_FILES[kind] and refusal.value.filename == str(tmp_path / "target")


def test_a_folder_is_made_inside_its_parent_and_never_through_a_link_that_leads_outside(tmp_path):
    parent, outside = tmp_path / "run", tmp_path / "outside"
    parent.mkdir()
    outside.mkdir()
    (parent / "inside").mkdir()
    (parent / "here").symlink_to(parent / "inside")  # a link that stays inside is followed
    assert files.own_folder(str(parent), "here", "a") == str(parent / "here" / "a")
    (parent / "away").symlink_to(outside)
    with pytest.raises(OSError) as refusal:
        files.own_folder(str(parent), "away", "a")
    assert refusal.value.filename == str(parent / "away")
    assert refusal.value.strerror == f"Is a link that leads outside {parent} (to {outside}), which nin_jax never writes through"
    (parent / "inside" / "deeper").symlink_to(outside)
    with pytest.raises(OSError, match="Is a link that leads outside"):
        files.own_folder(str(parent), "here", "deeper")
    assert os.listdir(outside) == []
