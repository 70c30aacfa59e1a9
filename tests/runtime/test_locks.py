"""Locks (nin_jax/runtime/locks.py): a live run keeps its workdir to itself, the lock of a killed
run blocks nothing, a link planted at a lock is refused, and two first builds of the dataset in
one data dir build once."""

import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from nin_jax.data import dataset
from nin_jax.run.checkpoints import WorkdirError
from nin_jax.runtime import locks
from nin_jax.runtime.errors import DataError

from conftest import NEEDS_SHARED_FASHION_MNIST, PRECIOUS, REPO_ROOT, Job, random_arrays, run_cli


LOCK_HOLDER = ("import sys, time; from nin_jax.runtime import locks\n"
               "with locks.exclusive(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)")


@pytest.fixture
def lock_holder():
    """Starts a process that holds a lock on a file and stays alive; kills it at the end."""
    started = []

    def start(path) -> subprocess.Popen:
        holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                                  cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT})
        started.append(holder)
        assert holder.stdout.readline() == "held\n"
        return holder

    yield start
    for holder in started:
        holder.kill()
        holder.wait()


def _snapshot(folder) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else b"<dir>"
            for path in sorted(folder.rglob("*"))}


def test_a_second_run_on_a_live_workdir_stops_at_once_and_changes_nothing(lock_holder, tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')  # a resume would trim it to its checkpoint
    holder = lock_holder(workdir / locks.WORKDIR_LOCK)
    before = _snapshot(workdir)
    result = run_cli("--workdir", str(workdir), "--resize", "67", "--manual_dir", str(tmp_path / "no_files"))
    assert result.returncode == 1
    assert result.stderr == (
        f"train.py: error: --workdir {workdir} is in use by another run (pid {holder.pid} on host "
        f"{socket.gethostname()}); wait for it to end, or use another --workdir\n"
    )
    assert _snapshot(workdir) == before


def test_the_lock_of_a_killed_run_does_not_block_the_next(lock_holder, tmp_path):
    holder = lock_holder(tmp_path / locks.WORKDIR_LOCK)
    with pytest.raises(WorkdirError):
        with locks.workdir_lock(str(tmp_path)):
            pass
    holder.kill()
    holder.wait()
    with locks.workdir_lock(str(tmp_path)):
        assert (tmp_path / locks.WORKDIR_LOCK).read_text() == f"pid {os.getpid()} on host {socket.gethostname()}\n"


@pytest.mark.slow
def test_every_process_of_a_job_refuses_a_live_workdir(lock_holder, tmp_path):
    """Process 0 holds the workdir for the job; the others learn that it is taken from process 0."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = lock_holder(workdir / locks.WORKDIR_LOCK)
    job = Job(workdir, tmp_path, "refused")
    try:
        codes = [process.wait(timeout=120) for process in job.processes]
    finally:
        job.close()
    line = (f"fake_data_train.py: error: --workdir {workdir} is in use by another run (pid {holder.pid} on host "
            f"{socket.gethostname()}); wait for it to end, or use another --workdir\n")
    assert codes == [1, 1] and [job.stderr(rank) for rank in range(2)] == [line, line]
    assert sorted(os.listdir(workdir)) == [locks.WORKDIR_LOCK]


def test_the_lock_file_is_removed_as_its_holder_ends_and_a_waiter_locks_the_file_then_there(tmp_path):
    """A waiter that had opened the file its holder then removed would hold a lock no one else sees:
    it locks the file at the path instead."""
    import threading

    path, held, release = str(tmp_path / "run.lock"), threading.Event(), threading.Event()
    waited, seen = [], []

    def holder():
        with locks.exclusive(path):
            held.set()
            release.wait(10)

    first = threading.Thread(target=holder)
    first.start()
    assert held.wait(10)

    def waiter():
        with locks.exclusive(path, wait=waited.append):
            seen.append(os.path.exists(path) and open(path).read())
            with pytest.raises(locks.Locked):  # the file at the path is the one held
                with locks.exclusive(path):
                    pass

    second = threading.Thread(target=waiter)
    second.start()
    time.sleep(0.5)
    release.set()
    first.join(10)
    second.join(10)
    assert len(waited) == 1 and seen == [f"pid {os.getpid()} on host {socket.gethostname()}\n"]
    assert not os.path.exists(path)


@pytest.mark.slow
@NEEDS_SHARED_FASHION_MNIST
def test_two_first_builds_in_one_data_dir_build_once(two_first_builds):
    """Two exports find the dataset unbuilt: the second starts while the first builds, waits for it,
    then reads what it built (conftest's `two_first_builds`, the suite's build of the dataset)."""
    data_dir, (first, second) = two_first_builds["data_dir"], two_first_builds["builds"]
    assert [first["returncode"], second["returncode"]] == [0, 0], two_first_builds
    waiting = (f"waiting for pid {first['pid']} on host {socket.gethostname()}, which is building Fashion-MNIST "
               f"in {data_dir}")
    # In a log, one line per phase of the build (tfds' bars, a hundred lines, and its 'Unknown size' stay out).
    building, built = first["stderr"].splitlines()
    assert building == (f"python -m nin_jax.export_arrays: building Fashion-MNIST in {data_dir}/fashion_mnist (once, "
                        f"about 140 MB; --data_dir puts it elsewhere)")
    assert re.fullmatch(r"python -m nin_jax.export_arrays: built Fashion-MNIST in \d+ s", built), first
    assert second["stderr"].splitlines() == [waiting] and "Unknown size" not in first["stdout"]
    wrote = "wrote {}: 60,000 training and 10,000 test examples"
    assert [build["stdout"].splitlines()[-1] for build in (first, second)] == [wrote.format(build["out"])
                                                                                for build in (first, second)]
    with np.load(first["out"]) as built, np.load(second["out"]) as read:
        assert built.files == read.files and all(np.array_equal(built[name], read[name]) for name in built.files)


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


def test_a_lock_held_by_another_program_is_not_blamed_on_the_ended_run_its_file_names(tmp_path):
    """`flock W/run.lock CMD` over the file of a killed run was called 'in use by another run (pid
    <the killed run's>)'."""
    import fcntl

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run.lock").write_text(f"pid {dead.stdout.strip()} on host {socket.gethostname()}\n")
    with open(tmp_path / "run.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another program's lock, taken as `flock` takes it
        with pytest.raises(WorkdirError) as refusal:
            with locks.workdir_lock(str(tmp_path)):
                pass
    assert str(refusal.value) == (
        f"--workdir {tmp_path} is in use by another program (pid {os.getpid()}, which is not a nin_jax run: "
        f"{tmp_path / 'run.lock'} still names pid {dead.stdout.strip()} on host {socket.gethostname()}, a run that "
        f"has ended); wait for it to end, or use another --workdir")
