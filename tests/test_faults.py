"""Runs that meet other runs or lose a peer, or meet a full disk or a full memory: a dead process
ends its peers in one line, a live run keeps its workdir to itself, two first-time builds of the
dataset do not collide, and a save or a step that finds no room ends the run in one line."""

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from nin_jax.runtime import locks, peers
from nin_jax import trainer
from nin_jax.run import training_run
from nin_jax.run.checkpoints import WorkdirError
from nin_jax.config import Config
from nin_jax.runtime.errors import OutOfMemory

from conftest import REPO_ROOT, SHARED_FASHION_MNIST
from test_multiprocess import HELPER, free_loopback_port
from test_train import run_cli

PEER_TIMEOUT_S = 6
BOUND_S = 60  # each survivor must end by itself well within this (the promise is 2 minutes by default)
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONUNBUFFERED": "1"}
# 100 steps of 8 examples, checkpointed every 5: long enough to kill a process in the middle.
JOB_FLAGS = ["--resize=67", "--batch_size=8", "--num_epochs=1", "--eval_examples=13", "--dropout_rate=0",
             "--parallel=pmap", "--checkpoint_every_steps=5", "--log_every_steps=1", "--num_processes=2",
             f"--peer_timeout_seconds={PEER_TIMEOUT_S}"]
JOB_EXAMPLES = 800
LOCK_HOLDER = ("import sys, time; from nin_jax.runtime import locks\n"
               "with locks.exclusive(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)")


class Job:
    """The processes of one localhost job, each with its stdout and stderr in files; `close` kills
    whichever still runs."""

    def __init__(self, workdir, log_dir, name: str, extra_flags=()):
        flags = [*JOB_FLAGS, f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{free_loopback_port()}",
                 *extra_flags]
        self.paths = [(log_dir / f"{name}{rank}.out", log_dir / f"{name}{rank}.err") for rank in range(2)]
        self.processes = []
        for rank, (out, err) in enumerate(self.paths):
            with open(out, "w") as out_file, open(err, "w") as err_file:
                command = [sys.executable, HELPER, str(JOB_EXAMPLES), *flags, f"--process_id={rank}"]
                self.processes.append(subprocess.Popen(command, stdout=out_file, stderr=err_file, env=ENV))

    def stdout(self, rank: int) -> str:
        return self.paths[rank][0].read_text()

    def stderr(self, rank: int) -> str:
        return self.paths[rank][1].read_text()

    def wait_for(self, condition, what: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {[self.stdout(r) for r in range(2)]}"
            assert all(process.poll() is None for process in self.processes), [self.stderr(r) for r in range(2)]
            time.sleep(0.2)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def _committed_steps(workdir) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if directory.is_dir() else []


def _kill_and_time_survivor(job: Job, victim: int) -> tuple[int, float]:
    job.processes[victim].send_signal(signal.SIGKILL)
    start = time.monotonic()
    code = job.processes[1 - victim].wait(timeout=BOUND_S)
    return code, time.monotonic() - start


def _one_line(text_source, timeout_s: float = 10) -> str:
    """The survivor's stderr, once it holds a line (the runtime's fatal end is reported by a
    separate small process, a moment after the survivor ended)."""
    deadline = time.monotonic() + timeout_s
    while not text_source() and time.monotonic() < deadline:
        time.sleep(0.1)
    return text_source()


@pytest.mark.slow
def test_a_killed_process_ends_its_peers_in_one_line_and_the_rerun_resumes(tmp_path):
    workdir = tmp_path / "run"
    advice = "; the other processes of this job stop too. Run all 2 processes again with the same commands to " \
             "resume from the latest checkpoint.\n"
    job = Job(workdir, tmp_path, "first")
    try:  # process 1 dies (kill -9) after a checkpoint: process 0 notices its silence
        job.wait_for(lambda: _committed_steps(workdir), "a first checkpoint")
        code, seconds = _kill_and_time_survivor(job, victim=1)
    finally:
        job.close()
    assert code != 0 and seconds < PEER_TIMEOUT_S + 20, (code, seconds)
    if code == peers.EXIT_CODE:  # the peer watch noticed the silence first
        assert job.stderr(0) == (f"fake_data_train.py: error: process 1 of this job has not been heard from for "
                                 f"{PEER_TIMEOUT_S} s (--peer_timeout_seconds): it has likely died{advice}")
    else:  # the runtime saw the lost connection first and ended process 0; its end is reported in one line
        line = _one_line(lambda: job.stderr(0))
        assert line.startswith("fake_data_train.py: error: ") and line.count("\n") == 1 and advice.strip() in line, line
    saved = _committed_steps(workdir)[-1]

    job = Job(workdir, tmp_path, "second")
    try:  # the rerun resumes; then process 0, the coordinator, dies
        job.wait_for(lambda: max(_committed_steps(workdir)) > saved, "a checkpoint after the resumed one")
        code, seconds = _kill_and_time_survivor(job, victim=0)
    finally:
        job.close()
    assert f"resuming from the checkpoint of step {saved} in {workdir / 'checkpoints'}" in job.stdout(0)
    assert code != 0 and seconds < PEER_TIMEOUT_S + 20, (code, seconds)
    line = _one_line(lambda: job.stderr(1))
    assert line.startswith("fake_data_train.py: error: ") and line.count("\n") == 1, line
    assert advice.strip() in line, line  # the words before depend on where the loss was seen first


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


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHARED_FASHION_MNIST),
                    reason=f"the Fashion-MNIST files are not in {SHARED_FASHION_MNIST}")
def test_two_first_builds_in_one_data_dir_build_once(tmp_path):
    """Two exports find the dataset unbuilt: the second starts while the first builds, waits for it,
    then reads what it built."""
    data_dir = tmp_path / "tfds"
    lock = data_dir / "fashion_mnist.lock"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}

    def export(name: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "nin_jax.export_arrays", "--data_dir", str(data_dir),
                   "--manual_dir", SHARED_FASHION_MNIST, "--out", str(tmp_path / f"{name}.npz")]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    exports = [export("first")]
    try:
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text()):  # the first holds the lock: it is building
            assert exports[0].poll() is None and time.monotonic() < deadline, exports[0].communicate()
            time.sleep(0.05)
        exports.append(export("second"))
        outputs = [process.communicate(timeout=300) for process in exports]
    finally:
        for process in exports:
            process.kill()
            process.wait()
    first, second = exports
    assert [first.returncode, second.returncode] == [0, 0], outputs
    waiting = (f"waiting for pid {first.pid} on host {socket.gethostname()}, which is building Fashion-MNIST "
               f"in {data_dir}")
    assert outputs[1][1].splitlines().count(waiting) == 1 and "waiting" not in outputs[0][1], outputs
    assert all("Traceback" not in err for _, err in outputs), outputs  # tfds' own progress and warnings may show
    assert "Downloading and preparing dataset" in outputs[0][0] and "preparing" not in outputs[1][0]  # tfds' words
    wrote = "wrote {}: 60,000 training and 10,000 test examples"
    assert [out.splitlines()[-1] for out, _ in outputs] == [wrote.format(tmp_path / f"{name}.npz")
                                                            for name in ("first", "second")]
    with np.load(tmp_path / "first.npz") as built, np.load(tmp_path / "second.npz") as read:
        assert built.files == read.files and all(np.array_equal(built[name], read[name]) for name in built.files)


# ---------------------------------------------------------------------------------------------
# Saves that cannot be written, and a workdir that another process reads while the run trains.

SAVE_BOUND_S = 60  # a run whose save failed must have ended by then
SMALL_RUN = ["--resize=67", "--batch_size=32", "--num_epochs=2", "--eval_examples=32", "--parallel=jit",
             "--checkpoint_every_steps=2", "--compile_cache=off"]  # 8 steps an epoch on 256 examples
CPU_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def fake_run(*args, timeout=SAVE_BOUND_S):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests", "fake_data_train.py"), "256", *args],
                          capture_output=True, text=True, timeout=timeout, env=CPU_ENV)


def test_a_file_where_the_checkpoints_go_ends_the_run_before_training_in_one_line(tmp_path):
    (tmp_path / "checkpoints").write_text("in the way")
    start = time.monotonic()
    result = fake_run(*SMALL_RUN, f"--workdir={tmp_path}")
    assert time.monotonic() - start < SAVE_BOUND_S
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"fake_data_train.py: error: cannot write to --workdir {tmp_path}: "
                             f"{tmp_path / 'checkpoints'}: File exists\n")
    assert (tmp_path / "checkpoints").read_text() == "in the way"


@contextlib.contextmanager
def mounted_tmpfs(folder, size: str):
    """A filesystem of `size` in memory, mounted at the new `folder` (as root only), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB filesystem: room for two of NiN's 8 MB checkpoints, not three."""
    with mounted_tmpfs(tmp_path / "disk", "20M") as disk:
        yield disk


def test_a_save_that_fails_on_a_full_disk_ends_the_run_in_one_line_and_the_same_command_resumes(small_disk):
    workdir = small_disk / "run"
    start = time.monotonic()
    result = fake_run(*SMALL_RUN, f"--workdir={workdir}")
    assert time.monotonic() - start < SAVE_BOUND_S  # exited by itself: no thread left waiting on the dead save
    assert result.returncode == 1, result.stderr
    match = re.fullmatch(rf"fake_data_train.py: error: cannot save the checkpoint of step (\d+) in "
                         rf"{re.escape(str(workdir / 'checkpoints'))}: No space left on device; the checkpoint of "
                         rf"step (\d+) is whole. Make room or fix the folder, then run the same command to resume\n",
                         result.stderr)
    assert match, result.stderr
    failed, whole = int(match[1]), int(match[2])
    assert whole in _committed_steps(workdir) and failed not in _committed_steps(workdir)

    subprocess.run(["mount", "-o", "remount,size=100M", str(small_disk)], check=True)
    result = fake_run(*SMALL_RUN, f"--workdir={workdir}", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"resuming from the checkpoint of step {whole} "), result.stdout
    assert "epoch 2/2" in result.stdout


def test_predict_reads_a_live_workdir_whose_run_deletes_old_checkpoints_and_never_calls_them_damaged(tmp_path):
    workdir = tmp_path / "run"
    flags = ["--resize=67", "--batch_size=8", "--num_epochs=50", "--eval_examples=8", "--parallel=jit",
             "--checkpoint_every_steps=1", "--keep_checkpoints=2", "--compile_cache=off", f"--workdir={workdir}"]
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        training = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "tests", "fake_data_train.py"), "64",
                                     *flags], stdout=out, stderr=subprocess.STDOUT, env=CPU_ENV)
    try:
        deadline = time.monotonic() + 120
        while len(_committed_steps(workdir)) < 2:
            assert training.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        for _ in range(2):
            result = fake_run("predict", f"--workdir={workdir}", timeout=120)
            assert result.returncode == 0, result.stderr
            assert "accuracy on 256 test images" in result.stdout
        assert training.poll() is None, "the run should still be training, deleting checkpoints as it goes"
    finally:
        training.kill()
        training.wait()


# ---------------------------------------------------------------------------------------------
# Out of memory: one line that names the flags which set the memory.

ADDRESS_SPACE = 10 << 30  # lets JAX start, but not allocate a step's 16 GB at batch 8192 and 96 px


def test_a_step_that_runs_out_of_memory_ends_in_one_line_naming_batch_resize_and_dtype(tmp_path):
    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    command = [sys.executable, os.path.join(REPO_ROOT, "tests", "fake_data_train.py"), "8192", "--resize=96",
               "--batch_size=8192", "--num_epochs=1", "--eval_examples=8", "--parallel=jit", "--compile_cache=off",
               f"--workdir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=CPU_ENV,
                            preexec_fn=limit_memory)
    assert result.returncode == 1, result.stderr
    assert re.fullmatch(r"fake_data_train.py: error: out of memory on the cpu device at --batch_size 8192, "
                        r"--resize 96, --dtype float32 \([A-Z_]+: [^)]*Out of memory allocating \d+ bytes\): "
                        r"use a smaller --batch_size, such as 4096; a checkpoint resumes only at its own --batch_size, "
                        rf"so use a new --workdir if {re.escape(str(tmp_path))} holds one\n", result.stderr), result.stderr
    assert _committed_steps(tmp_path) == []


def test_a_host_memory_error_names_the_sizes_and_other_runtime_errors_pass_through():
    config = Config(batch_size=6, resize=67, dtype="bfloat16")
    with pytest.raises(OutOfMemory, match=r"^out of memory on the host at --batch_size 6, --resize 67, --dtype "
                                          r"bfloat16 \(MemoryError\): use a smaller --batch_size, such as 2$"):
        with training_run.out_of_memory_explained(config, num_devices=2, workdir=None):
            raise MemoryError()
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        with training_run.out_of_memory_explained(config, num_devices=1, workdir=None):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")


@pytest.fixture
def read_only_run(tmp_path):
    """A finished run's workdir on a filesystem then mounted read-only, as a shared results disk."""
    with mounted_tmpfs(tmp_path / "disk", "40M") as disk:
        result = fake_run("--resize=67", "--batch_size=32", "--num_epochs=1", "--eval_examples=32", "--parallel=jit",
                          "--compile_cache=off", f"--workdir={disk / 'run'}", timeout=120)
        assert result.returncode == 0, result.stderr
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        yield disk / "run"


def test_a_read_only_workdir_is_read_by_predict_and_refused_by_train_in_one_line(read_only_run):
    workdir = read_only_run
    result = fake_run("predict", f"--workdir={workdir}", timeout=120)
    assert result.returncode == 1
    assert result.stderr == (f"python -m nin_jax.predict: error: cannot write {workdir / 'predictions.png'}: "
                             f"Read-only file system\n")  # the checkpoint was read: only the picture failed

    result = fake_run("--resize=67", "--batch_size=32", "--num_epochs=2", "--eval_examples=32", "--parallel=jit",
                      "--compile_cache=off", f"--workdir={workdir}")
    assert result.returncode == 1
    assert result.stderr.startswith(f"fake_data_train.py: error: cannot write to --workdir {workdir}"), result.stderr
    assert result.stderr.endswith(": Read-only file system\n") and result.stderr.count("\n") == 1, result.stderr


def test_export_arrays_to_a_read_only_disk_is_refused_before_reading_any_data(read_only_run, tmp_path):
    out = read_only_run / "fashion_mnist.npz"
    result = subprocess.run([sys.executable, "-m", "nin_jax.export_arrays", "--out", str(out), "--data_dir",
                             str(tmp_path / "no_data")], capture_output=True, text=True, timeout=60, env=CPU_ENV,
                            cwd=REPO_ROOT)
    assert result.returncode == 1
    assert result.stderr == f"python -m nin_jax.export_arrays: error: cannot write {out}: Read-only file system\n"
    assert not out.exists()
