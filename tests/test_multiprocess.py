"""Two processes on localhost, each with two fake CPU devices, train like one process with four,
under pmap and under sharding, and stop together wherever a signal reaches them."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import serialization

from nin_jax.runtime import peers
from nin_jax.run import outputs, progress
from nin_jax import steps, trainer
from nin_jax.run.checkpoints import CHECKPOINT_DIR, Checkpoints
from nin_jax.config import Config
from nin_jax.run.stopping import STOPPED_BY_ANOTHER_PROCESS

from conftest import REPO_ROOT

HELPER = os.path.join(REPO_ROOT, "tests", "fake_data_train.py")
NUM_EXAMPLES = 40  # 5 steps of 8, each process feeding 4 examples to its 2 devices
SETTINGS = dict(resize=67, batch_size=8, num_epochs=1, eval_examples=13, dropout_rate=0.0, parallel="pmap")
TIMEOUT_S = 240  # each job; the machine may be busy


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def processes(commands, env, log_dir):
    """Starts every command; on leaving, kills whichever still runs."""
    running = []
    try:
        for rank, command in enumerate(commands):
            with open(os.path.join(log_dir, f"process{rank}.log"), "w") as log:
                running.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
        yield running
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["pmap", "sharding"])
def test_two_processes_match_one_process_with_all_devices(fake_data, tmp_path, parallel):
    workdir = tmp_path / "run"
    settings = {**SETTINGS, "parallel": parallel}
    flags = [f"--{name}={value}" for name, value in settings.items()] + [
        f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{free_loopback_port()}", "--num_processes=2"
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONUNBUFFERED": "1"}
    commands = [[sys.executable, HELPER, str(NUM_EXAMPLES), *flags, f"--process_id={rank}"] for rank in range(2)]
    with processes(commands, env, tmp_path) as running:
        codes = [process.wait(timeout=TIMEOUT_S) for process in running]
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


STOP_SETTINGS = dict(resize=67, batch_size=8, num_epochs=2, eval_examples=8, dropout_rate=0.0, checkpoint_every_steps=0)
STOP_EXAMPLES = 256  # 32 steps per epoch: more than progress.LAG_STEPS, so the stop lands within epoch 1
STOP_STEPS_PER_EPOCH = 32


def two_process_commands(workdir, parallel: str) -> list[list[str]]:
    flags = [f"--{name}={value}" for name, value in STOP_SETTINGS.items()] + [
        f"--parallel={parallel}", f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{free_loopback_port()}",
        "--num_processes=2",
    ]
    return [[sys.executable, HELPER, str(STOP_EXAMPLES), *flags, f"--process_id={rank}"] for rank in range(2)]


def saved_steps(workdir) -> list[int]:
    return sorted(int(name) for name in os.listdir(workdir / CHECKPOINT_DIR) if name.isdigit())


def wait_for_line(path, text: str, running) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while text not in path.read_text():
        assert all(process.poll() is None for process in running), f"a process ended early:\n{path.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} in time:\n{path.read_text()}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_sigterm_to_one_process_stops_both_after_the_same_step_and_the_rerun_resumes_exactly(tmp_path):
    """With sharding, the default. The stop's agreement is the same code under pmap; a pmap job of
    two processes resuming is tests/test_faults.py's killed-process test, resuming exactly under
    pmap tests/test_resume.py's."""
    parallel = "sharding"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONUNBUFFERED": "1"}
    stopped, uninterrupted = tmp_path / "stopped", tmp_path / "uninterrupted"
    logs = {name: tmp_path / "logs" / name for name in ("stopped", "resumed", "uninterrupted")}
    for folder in logs.values():
        folder.mkdir(parents=True)
    with processes(two_process_commands(stopped, parallel), env, logs["stopped"]) as running:
        wait_for_line(logs["stopped"] / "process0.log", "compiled the train and eval steps", running)
        running[1].send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=TIMEOUT_S) for process in running]
    logged = [(logs["stopped"] / f"process{rank}.log").read_text() for rank in range(2)]
    assert codes == [STOPPED_BY_ANOTHER_PROCESS, 128 + signal.SIGTERM], logged
    steps_logged = [re.search(r"stopped .*after step (\d+)", output) for output in logged]
    assert all(steps_logged), logged
    step = int(steps_logged[0][1])
    assert int(steps_logged[1][1]) == step and step % STOP_STEPS_PER_EPOCH, logged
    assert "stopped by SIGTERM after step" in logged[1] and "another process of this run was asked to stop" in logged[0]
    assert "stopping with the other processes after the same step, at most 10 steps from now (SIGTERM)" in logged[1]
    assert "Traceback" not in "".join(logged)
    assert saved_steps(stopped) == [step]  # one checkpoint, saved by both together

    # One job at a time: on a busy machine, two starting together can miss gloo's connect timeout.
    for name, workdir in (("resumed", stopped), ("uninterrupted", uninterrupted)):
        with processes(two_process_commands(workdir, parallel), env, logs[name]) as running:
            codes = [process.wait(timeout=TIMEOUT_S) for process in running]
        assert codes == [0, 0], (logs[name] / "process0.log").read_text()
    assert f"resuming from the checkpoint of step {step} " in (logs["resumed"] / "process0.log").read_text()

    config = Config(**STOP_SETTINGS, parallel=parallel)
    states = []
    for workdir in (stopped, uninterrupted):
        with Checkpoints(str(workdir), config) as checkpoints:
            states.append(checkpoints.restore_latest(steps.create_train_state(config)).state)
    assert int(states[0].step) == int(states[1].step) == 2 * STOP_STEPS_PER_EPOCH
    jax.tree_util.tree_map(np.testing.assert_array_equal, serialization.to_state_dict(states[0]),
                           serialization.to_state_dict(states[1]))
    timings = {"examples_per_sec", "train_seconds", "compile_seconds"}
    records = [[{key: value for key, value in record.items() if key not in timings} for record in
                outputs.read_metrics(str(workdir))] for workdir in (stopped, uninterrupted)]
    assert records[0] == records[1] and len(records[0]) == 2


def test_the_runtime_client_is_where_peers_reaches_for_it():
    """`peers.client` is the one place that reads JAX's private `jax._src.distributed`: should JAX
    move it, this fails before any job of several processes does. Without `jax.distributed` started
    there is no client."""
    assert peers.client() is None
