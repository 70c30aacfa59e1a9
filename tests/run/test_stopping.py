"""Stopping (nin_jax/run/stopping.py): Ctrl-C, SIGTERM and SIGHUP, once or twice, before training
or during it, in one process or in one of a job's two; each stop says in one line what was saved
and how to resume, and the rerun resumes exactly."""

import os
import re
import signal
import sys
import time
from unittest import mock

import jax
import numpy as np
import pytest
from flax import serialization

from nin_jax import input_pipeline, steps
from nin_jax.config import Config
from nin_jax.run import outputs, stopping
from nin_jax.run.checkpoints import CHECKPOINT_DIR, Checkpoints
from nin_jax.run.stopping import STOPPED_BY_ANOTHER_PROCESS
from nin_jax.runtime.commands import SAME_REQUEST_SECONDS, STOP_SIGNALS

import train

from conftest import (HELPER, JOB_ENV, JOB_TIMEOUT_S, NUM_EXAMPLES, TOTAL_STEPS, free_loopback_port, processes, resume_flags,
                      saved_steps, training_process, wait_until)


def test_timeouts_double_sigterm_is_one_request_said_within_a_second_and_saved_within_15_s_as_at_224_px(tmp_path):
    """GNU `timeout` signals the process and then its process group, microseconds apart (its SIGALRM
    is its time being up): in 1 of 2 tries the run ended `stopped at once by a second SIGTERM`.
    Steps after step 2 take 5 s longer, as a step at 224 px does on a 2-core CPU: the dispatch runs
    at most a couple of seconds of steps ahead (run/progress.py), so the run stops, saved, within
    15 s of the signal, after the step it names."""
    workdir, log_path = tmp_path / "run", tmp_path / "log.txt"
    with training_process(workdir, log_path, env={"SLOW_STEPS": "2:5"}, wrapper=["timeout", "--preserve-status", "600"],
                          parallel="jit", checkpoint_every_steps=2) as timeout:
        wait_until(lambda: 2 in saved_steps(workdir), timeout, log_path)
        timeout.send_signal(signal.SIGALRM)
        signalled = time.monotonic()
        wait_until(lambda: "stopping after" in log_path.read_text(), timeout, log_path, timeout_s=1.0)
        assert timeout.wait(timeout=15 - (time.monotonic() - signalled)) == 128 + signal.SIGTERM, log_path.read_text()
    output = log_path.read_text()
    assert output.count("stopping after step") == 1 and "stopped at once" not in output, output
    match = re.fullmatch(
        rf"fake_data_train.py: stopped by SIGTERM after step (\d+): saved a checkpoint in "
        rf"{re.escape(str(workdir / CHECKPOINT_DIR))}; run the same command to resume", output.strip().splitlines()[-1]
    )
    assert match, output
    assert saved_steps(workdir)[-1] == int(match[1]) < TOTAL_STEPS
    assert "Traceback" not in output


def test_ctrl_c_answers_at_once_while_a_step_takes_10_s_and_a_second_one_stops_the_run_at_once(tmp_path):
    """Steps after step 2 take 10 s on the device, as at 224 px on a CPU, while the loop waits inside
    JAX for them: the first Ctrl-C still says within a second what will happen, and the second one
    ends the process within two, saying which checkpoint is kept."""
    workdir, log_path = tmp_path / "run", tmp_path / "log.txt"
    with training_process(workdir, log_path, env={"SLOW_STEPS": "2:10"}, parallel="jit",
                          checkpoint_every_steps=2) as process:
        wait_until(lambda: 2 in saved_steps(workdir), process, log_path)  # then the loop waits for steps 3 and 4
        process.send_signal(signal.SIGINT)
        wait_until(lambda: "stopping after" in log_path.read_text(), process, log_path, timeout_s=1.0)
        # Step 3 or 5: the loop waits inside the dispatch of step 3, or (where a dispatch returns at
        # once) in the checkpoint of step 4, which waits for both slow steps.
        assert re.fullmatch(r"fake_data_train.py: stopping after step [35] \(SIGINT\), then saving; press Ctrl-C "
                            r"again to stop now without saving this step", log_path.read_text().splitlines()[-1])
        time.sleep(SAME_REQUEST_SECONDS)  # a person reads the line, then asks again
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=2.0) == 130, log_path.read_text()
    assert log_path.read_text().splitlines()[-1] == (
        f"fake_data_train.py: stopped at once by a second SIGINT: the checkpoint of step 2 in "
        f"{workdir / CHECKPOINT_DIR} is kept; run the same command to resume from it")
    assert saved_steps(workdir) == [2]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_sigterm_or_sighup_before_training_starts_ends_the_run_in_one_line(fake_data, tmp_path, capsys, signum):
    """A scheduler's SIGTERM, or a closed terminal's SIGHUP, while the data loads: nothing to save yet."""
    def load_with_a_signal(config):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal should have ended the run")

    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)]
    with fake_data(NUM_EXAMPLES), mock.patch("nin_jax.data.dataset.load_datasets", load_with_a_signal), \
            pytest.raises(SystemExit) as exit_status:
        train.main([*resume_flags(parallel="jit"), f"--workdir={tmp_path}"])
    assert exit_status.value.code == 128 + signum
    name = signal.Signals(signum).name
    assert capsys.readouterr().err == (f"{os.path.basename(sys.argv[0])}: interrupted by {name}; the same command "
                                       f"resumes from the latest checkpoint, if any\n")
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)] == handlers


def test_a_second_sigterm_during_training_stops_at_once_in_one_line_and_keeps_the_checkpoints(fake_data, tmp_path,
                                                                                              capsys):
    """A scheduler that sends SIGTERM twice: the second does not wait for the save the first asked for
    (here any signal after the first line is a second request); the usual handlers come back."""
    handlers = [signal.getsignal(signum) for signum in STOP_SIGNALS]
    train_batches = input_pipeline.train_batches

    def batches_with_two_sigterms_before_the_fourth(*args, **kwargs):
        for index, batch in enumerate(train_batches(*args, **kwargs)):
            if index == 3:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    with fake_data(NUM_EXAMPLES), mock.patch.object(input_pipeline, "train_batches",
                                                    batches_with_two_sigterms_before_the_fourth), \
            mock.patch.object(stopping, "SAME_REQUEST_SECONDS", 0), pytest.raises(SystemExit) as exit_status:
        train.main([*resume_flags(parallel="jit"), f"--workdir={tmp_path}"])
    assert exit_status.value.code == 128 + signal.SIGTERM
    prog = os.path.basename(sys.argv[0])
    assert capsys.readouterr().err == (
        f"{prog}: stopping after step 4 (SIGTERM), then saving; send SIGTERM again to stop now without saving this step\n"
        f"{prog}: stopped at once by a second SIGTERM: the checkpoint of step 3 in {tmp_path / CHECKPOINT_DIR} is "
        f"kept; run the same command to resume from it\n")
    assert saved_steps(tmp_path) == [1, 2, 3]  # every step before the signals, each checkpointed whole
    assert [signal.getsignal(signum) for signum in STOP_SIGNALS] == handlers


STOP_SETTINGS = dict(resize=67, batch_size=8, num_epochs=2, eval_examples=8, dropout_rate=0.0, checkpoint_every_steps=0)
STOP_EXAMPLES = 128  # 16 steps per epoch: more than progress.LAG_STEPS, so the stop lands within epoch 1
STOP_STEPS_PER_EPOCH = 16


def two_process_commands(workdir, parallel: str) -> list[list[str]]:
    flags = [f"--{name}={value}" for name, value in STOP_SETTINGS.items()] + [
        f"--parallel={parallel}", f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{free_loopback_port()}",
        "--num_processes=2",
    ]
    return [[sys.executable, HELPER, str(STOP_EXAMPLES), *flags, f"--process_id={rank}"] for rank in range(2)]


def wait_for_line(path, text: str, running) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while text not in path.read_text():
        assert all(process.poll() is None for process in running), f"a process ended early:\n{path.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} in time:\n{path.read_text()}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_sigterm_to_one_process_stops_both_after_the_same_step_and_the_rerun_resumes_exactly(tmp_path):
    """With sharding, the default. The stop's agreement is the same code under pmap; a pmap job of
    two processes resuming is tests/runtime/test_distributed.py's killed-process test, resuming exactly under
    pmap tests/run/test_training_run.py's."""
    parallel = "sharding"
    stopped, uninterrupted = tmp_path / "stopped", tmp_path / "uninterrupted"
    logs = {name: tmp_path / "logs" / name for name in ("stopped", "resumed", "uninterrupted")}
    for folder in logs.values():
        folder.mkdir(parents=True)
    with processes(two_process_commands(stopped, parallel), JOB_ENV, logs["stopped"]) as running:
        wait_for_line(logs["stopped"] / "process0.log", "compiled the train and eval steps", running)
        running[1].send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=JOB_TIMEOUT_S) for process in running]
    logged = [(logs["stopped"] / f"process{rank}.log").read_text() for rank in range(2)]
    assert codes == [STOPPED_BY_ANOTHER_PROCESS, 128 + signal.SIGTERM], logged
    steps_logged = [re.search(r"stopped .*after step (\d+)", output) for output in logged]
    assert all(steps_logged), logged
    step = int(steps_logged[0][1])
    assert int(steps_logged[1][1]) == step and step % STOP_STEPS_PER_EPOCH, logged
    assert "stopped by SIGTERM after step" in logged[1] and "another process of this run was asked to stop" in logged[0]
    assert "stopping with the other processes after the same step, at most 4 steps from now (SIGTERM)" in logged[1]
    assert "Traceback" not in "".join(logged)
    assert saved_steps(stopped) == [step]  # one checkpoint, saved by both together

    # One job at a time: on a busy machine, two starting together can miss gloo's connect timeout.
    for name, workdir in (("resumed", stopped), ("uninterrupted", uninterrupted)):
        with processes(two_process_commands(workdir, parallel), JOB_ENV, logs[name]) as running:
            codes = [process.wait(timeout=JOB_TIMEOUT_S) for process in running]
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
