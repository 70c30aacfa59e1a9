"""Jobs of several processes on localhost (nin_jax/runtime/distributed.py): two processes of two
fake CPU devices train like one process with four; a process whose peers never arrive, or an
unknown coordinator host, ends in one line; a killed process ends its peers in one line and the
rerun resumes."""

import re
import signal
import sys
import time

import jax
import numpy as np
import pytest

from nin_jax import steps, trainer
from nin_jax.config import Config
from nin_jax.run import outputs
from nin_jax.run.checkpoints import Checkpoints
from nin_jax.runtime import peers

from conftest import (HELPER, JOB_ENV, JOB_TIMEOUT_S, NUM_EXAMPLES, PEER_TIMEOUT_S, SMALL_JOB, Job, free_loopback_port,
                      processes, run_on_cpu, saved_steps)


SETTINGS = dict(resize=67, batch_size=8, num_epochs=1, eval_examples=13, dropout_rate=0.0, parallel="pmap")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["pmap", "sharding"])
def test_two_processes_match_one_process_with_all_devices(fake_data, tmp_path, parallel):
    workdir = tmp_path / "run"
    settings = {**SETTINGS, "parallel": parallel}
    flags = [f"--{name}={value}" for name, value in settings.items()] + [
        f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{free_loopback_port()}", "--num_processes=2"
    ]
    commands = [[sys.executable, HELPER, str(NUM_EXAMPLES), *flags, f"--process_id={rank}"] for rank in range(2)]
    with processes(commands, JOB_ENV, tmp_path) as running:
        codes = [process.wait(timeout=JOB_TIMEOUT_S) for process in running]
    logs = [(tmp_path / f"process{rank}.log").read_text() for rank in range(2)]
    assert codes == [0, 0], logs
    assert "epoch 1/1: loss" in logs[0] and "epoch 1/1" not in logs[1]  # only process 0 talks

    config = Config(**settings)
    with fake_data(NUM_EXAMPLES):
        one_process_state, one_process_records = trainer.train_and_evaluate(config, log=lambda line: None)
    with Checkpoints(str(workdir), config) as checkpoints:
        two_process_state = checkpoints.restore_latest(steps.create_train_state(config)).state
    assert int(two_process_state.step) == int(one_process_state.step) == 5
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), two_process_state.params,
        one_process_state.params,
    )
    (record,) = outputs.read_metrics(str(workdir))
    assert record["devices"] == "4 cpu devices in 2 processes" and record["parallel"] == parallel
    assert record["train_examples"] == NUM_EXAMPLES and record["test_examples"] == 13
    np.testing.assert_allclose(record["test_accuracy"], one_process_records[0]["test_accuracy"])
    np.testing.assert_allclose(record["train_loss"], one_process_records[0]["train_loss"], rtol=1e-5)


def test_an_unknown_coordinator_host_is_one_line():
    result = run_on_cpu([HELPER, "64", *SMALL_JOB, "--coordinator_address=no-such-host.invalid:1234", "--num_processes=2"])
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("fake_data_train.py: error: --coordinator_address no-such-host.invalid:1234: "
                                    "cannot find the host no-such-host.invalid ("), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_whose_peers_never_arrive_ends_in_one_line_within_the_peer_timeout(rank, tmp_path):
    """Process 0 of a job of 2 whose process 1 never starts waited 307 s, then the runtime aborted
    with a C++ stack trace (status 134); process 1 without its coordinator did the same."""
    address = f"127.0.0.1:{free_loopback_port()}"
    start = time.monotonic()
    result = run_on_cpu([HELPER, "64", *SMALL_JOB, f"--workdir={tmp_path}/run", f"--coordinator_address={address}",
                  "--num_processes=2", f"--process_id={rank}", f"--peer_timeout_seconds={PEER_TIMEOUT_S}"],
                 timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        f"fake_data_train.py: error: not all 2 processes of this job reached the coordinator at {address} within "
        f"{PEER_TIMEOUT_S} s (--peer_timeout_seconds); start every process, process 0 first, within that time of "
        f"each other, or raise --peer_timeout_seconds\n")
    assert elapsed < PEER_TIMEOUT_S + 30, elapsed  # the interpreter's start and imports, then the wait


BOUND_S = 60  # each survivor must end by itself well within this (the promise is 2 minutes by default)


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
        job.wait_for(lambda: saved_steps(workdir), "a first checkpoint")
        code, seconds = _kill_and_time_survivor(job, victim=1)
    finally:
        job.close()
    assert code != 0 and seconds < PEER_TIMEOUT_S + 20, (code, seconds)
    if code == peers.EXIT_CODE:  # nin_jax noticed: the peer watch the silence, or a collective the lost connection
        silence = (f"fake_data_train.py: error: process 1 of this job has not been heard from for {PEER_TIMEOUT_S} s "
                   f"(--peer_timeout_seconds): it has likely died{advice}")
        failed = re.fullmatch(r"fake_data_train\.py: error: an operation across the processes failed \(.+\): "
                              rf"another process of this job has likely died{re.escape(advice)}", job.stderr(0))
        assert job.stderr(0) == silence or failed, job.stderr(0)
    else:  # the runtime saw the lost connection first and ended process 0; its end is reported in one line
        line = _one_line(lambda: job.stderr(0))
        assert line.startswith("fake_data_train.py: error: ") and line.count("\n") == 1 and advice.strip() in line, line
    saved = saved_steps(workdir)[-1]

    job = Job(workdir, tmp_path, "second")
    try:  # the rerun resumes; then process 0, the coordinator, dies
        job.wait_for(lambda: max(saved_steps(workdir)) > saved, "a checkpoint after the resumed one")
        code, seconds = _kill_and_time_survivor(job, victim=0)
    finally:
        job.close()
    assert f"resuming from the checkpoint of step {saved} in {workdir / 'checkpoints'}" in job.stdout(0)
    assert code != 0 and seconds < PEER_TIMEOUT_S + 20, (code, seconds)
    line = _one_line(lambda: job.stderr(1))
    assert line.startswith("fake_data_train.py: error: ") and line.count("\n") == 1, line
    assert advice.strip() in line, line  # the words before depend on where the loss was seen first
