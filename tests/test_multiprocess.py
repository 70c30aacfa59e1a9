"""Two processes on localhost, each with two fake CPU devices, train like one process with four,
under pmap and under sharding."""

import contextlib
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from nin_jax import reporting, steps, trainer
from nin_jax.checkpoints import Checkpoints
from nin_jax.config import Config

from conftest import REPO_ROOT

HELPER = os.path.join(REPO_ROOT, "tests", "fake_data_train.py")
NUM_EXAMPLES = 40  # 5 steps of 8, each process feeding 4 examples to its 2 devices
SETTINGS = dict(resize=67, batch_size=8, num_epochs=1, eval_examples=13, dropout_rate=0.0, parallel="pmap")
TIMEOUT_S = 100


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
    (record,) = reporting.read_metrics(str(workdir))
    assert record["devices"] == "4 cpu devices in 2 processes" and record["parallel"] == parallel
    assert record["train_examples"] == NUM_EXAMPLES and record["test_examples"] == 13
    np.testing.assert_allclose(record["test_accuracy"], one_process_records[0]["test_accuracy"])
    np.testing.assert_allclose(record["train_loss"], one_process_records[0]["train_loss"], rtol=1e-5)
