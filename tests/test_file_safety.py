"""Nothing outside the workdir, the data folder and the compile cache is written, nothing is written
through a link planted inside them, and every file honours the user's umask."""

import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from nin_jax.data import dataset
from nin_jax.runtime import files
from nin_jax.run import outputs
from nin_jax.runtime.errors import DataError

from conftest import REPO_ROOT
from test_benchmarks import random_arrays
from test_train import run_cli

PRECIOUS = "a file of someone else's, outside the workdir\n"


@pytest.fixture
def precious(tmp_path):
    """A file that a planted link points at: it must come out as it went in."""
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_text(PRECIOUS)
    return path


def test_a_link_planted_at_the_workdir_lock_is_refused_and_its_target_kept(tmp_path, precious):
    workdir, data = tmp_path / "run", tmp_path / "arrays.npz"
    random_arrays(data, 16, 8)
    workdir.mkdir()
    (workdir / "run.lock").symlink_to(precious)
    result = run_cli("--data_arrays", str(data), "--resize", "67", "--batch_size", "8", "--num_epochs", "2",
                     "--compile_cache", "off", "--workdir", str(workdir))
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"train.py: error: cannot write to --workdir {workdir}: {workdir / 'run.lock'} is a "
                             f"link or not a plain file, which nin_jax never writes to; remove it\n")
    assert precious.read_text() == PRECIOUS


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_a_link_at_the_data_folder_lock_is_refused_and_its_target_kept(tmp_path, precious, link):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    lock = data_dir / "fashion_mnist.lock"
    if link == "hard":
        os.link(precious, lock)
    else:
        lock.symlink_to(precious)
    with pytest.raises(DataError, match=f"^cannot write to --data_dir {data_dir} to build Fashion-MNIST there: "
                                        f"{lock} is a link or not a plain file"):
        with dataset._build_lock(str(data_dir)):
            pass
    assert precious.read_text() == PRECIOUS


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
    assert written.name.startswith(f"events.out.tfevents.") and written.stat().st_size > 0


# Plants a link where the runtime's log of this very process used to go (a name that anyone could
# guess from the host and the pid), then routes the log as a process of a multi-process job does.
ROUTE_LOG = """
import os, socket, sys, tempfile
guessable = f"nin_jax_runtime_{socket.gethostname()}_{os.getpid()}.log"
os.symlink(sys.argv[1], os.path.join(tempfile.gettempdir(), guessable))
from nin_jax.runtime import peers
log = peers.route_runtime_log(2)
folder = os.stat(os.path.dirname(log))
print(log, oct(folder.st_mode & 0o777), folder.st_uid == os.geteuid())
"""


def test_the_runtime_log_of_several_processes_goes_to_a_private_folder_not_through_a_planted_link(tmp_path, precious):
    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir(mode=0o777)
    result = subprocess.run([sys.executable, "-c", ROUTE_LOG, str(precious)], capture_output=True, text=True,
                            timeout=60, cwd=REPO_ROOT, env={**os.environ, "TMPDIR": str(shared_tmp)})
    assert result.returncode == 0, result.stderr
    assert precious.read_text() == PRECIOUS
    log, mode, owned = result.stdout.split()
    folder = os.path.dirname(log)
    assert os.path.dirname(folder) == str(shared_tmp) and os.path.basename(log) == "runtime.log"
    assert (mode, owned) == ("0o700", "True")
    deadline = time.monotonic() + 30
    while os.path.exists(folder) and time.monotonic() < deadline:  # the reporter ends with its process
        time.sleep(0.1)
    assert not os.path.exists(folder)  # nothing was logged: nothing is left behind


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
    assert {"config.json", "metrics.jsonl", "curves.png", "predictions.png", "run.lock", "checkpoints"} <= {
        path.name for path in written}
    open_to_others = {str(path): oct(stat.S_IMODE(path.stat().st_mode)) for path in written
                      if path.stat().st_mode & 0o077}
    assert not open_to_others
