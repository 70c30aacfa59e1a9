"""Stopping and resuming: a run killed, interrupted or rolled back mid-epoch ends exactly like an
uninterrupted one, and a diverging run stops without saving its bad state."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from unittest import mock

import jax
import numpy as np
import pytest
from flax import serialization

from nin_jax import input_pipeline, steps, trainer
from nin_jax.run import outputs
from nin_jax.run.checkpoints import CHECKPOINT_DIR, Checkpoints
from nin_jax.config import Config
from nin_jax.run.stopping import Interrupted

import train

from conftest import REPO_ROOT

NUM_EXAMPLES = 40
# The batch size, learning rate and dropout of test_train.py: the compiled steps come from the cache.
SETTINGS = dict(resize=67, batch_size=8, num_epochs=2, eval_examples=13, checkpoint_every_steps=1)
STEPS_PER_EPOCH = 5  # 40 examples in batches of 8
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
TIMING_FIELDS = {"examples_per_sec", "train_seconds", "compile_seconds"}
HELPER = os.path.join(REPO_ROOT, "tests", "fake_data_train.py")
TIMEOUT_S = 120


def config(**changes) -> Config:
    return Config(**{**SETTINGS, **changes})


def flags(**changes) -> list[str]:
    return [f"--{name}={value}" for name, value in {**SETTINGS, **changes}.items()]


def saved_steps(workdir) -> list[int]:
    folder = os.path.join(workdir, CHECKPOINT_DIR)
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit()) if os.path.isdir(folder) else []


def latest_checkpoint(workdir, **changes) -> steps.TrainState:
    run_config = config(**changes)
    with Checkpoints(str(workdir), run_config) as checkpoints:
        return checkpoints.restore_latest(steps.create_train_state(run_config)).state


def assert_same_state(a: steps.TrainState, b: steps.TrainState) -> None:
    jax.tree_util.tree_map(np.testing.assert_array_equal, serialization.to_state_dict(a), serialization.to_state_dict(b))


def deterministic(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in TIMING_FIELDS} for record in records]


@contextlib.contextmanager
def training_process(workdir, log_path, env=(), **changes):
    """`fake_data_train.py` in a process of its own, with stdout and stderr in `log_path` and `env`
    added to its environment; killed on leaving the block if it is still running."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, HELPER, str(NUM_EXAMPLES), *flags(**changes), f"--workdir={workdir}"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **dict(env)},
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def wait_until(condition, process, log_path, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        with open(log_path) as log:
            assert process.poll() is None, f"training ended before the test could stop it:\n{log.read()}"
        assert time.monotonic() < deadline, f"training did not get there in {timeout_s} s:\n{log_path.read_text()}"
        time.sleep(0.02)


def uninterrupted_run(workdir, parallel: str, **changes):
    """The reference: a run of SETTINGS in this process, never stopped."""
    from conftest import fake_fashion_mnist

    with fake_fashion_mnist(NUM_EXAMPLES):
        return trainer.train_and_evaluate(config(parallel=parallel, **changes), str(workdir), log=lambda line: None)


def resume(workdir, parallel: str, fake_data, **changes) -> tuple[steps.TrainState, list[dict], list[str]]:
    """The same run again, in this process: the state, the records and the lines it logs."""
    lines = []
    with fake_data(NUM_EXAMPLES):
        state, records = trainer.train_and_evaluate(config(parallel=parallel, **changes), str(workdir), log=lines.append)
    return state, records, lines


# Every option of the strong recipe: momentum, schedule, weight decay, label smoothing and the
# batch-norm running statistics must all continue where they stopped.
STRONG = dict(recipe="strong", learning_rate=0.02, momentum=0.9, nesterov=True, lr_schedule="onecycle",
              warmup_epochs=1.0, weight_decay=5e-4, label_smoothing=0.1, batch_norm=True)


@pytest.mark.parametrize("changes", [{}, STRONG], ids=["reference", "strong_with_every_option"])
def test_resuming_mid_epoch_ends_like_the_uninterrupted_run_and_a_finished_run_stays_finished(fake_data, tmp_path,
                                                                                               changes):
    full_state, full_records = uninterrupted_run(tmp_path, "jit", **changes)
    assert saved_steps(tmp_path) == [8, 9, 10]
    for step in (9, 10):  # as if the run had died after step 8: epoch 2, 3 of 5 batches done
        shutil.rmtree(tmp_path / CHECKPOINT_DIR / str(step))

    state, records, lines = resume(tmp_path, "jit", fake_data, **changes)
    assert lines[0] == f"resuming from the checkpoint of step 8 in {tmp_path / CHECKPOINT_DIR}: epoch 2, batch 4 of 5 is next"
    assert_same_state(state, full_state)
    assert deterministic(outputs.read_metrics(str(tmp_path))) == deterministic(records) == deterministic(full_records)

    state, records, lines = resume(tmp_path, "jit", fake_data, **changes)
    how_to_go_on = ("its --lr_schedule onecycle spans exactly these epochs, so it cannot go on: train a longer run in a "
                    "new --workdir" if changes else "raise --num_epochs to train on")
    assert lines == [f"the run in {tmp_path} is finished: its checkpoint has all 2 epochs (10 steps); {how_to_go_on}"]
    assert_same_state(state, full_state)
    assert deterministic(records) == deterministic(full_records)


def test_a_pmap_run_killed_mid_epoch_resumes_to_the_same_parameters_and_metrics(fake_data, tmp_path):
    reference_state, reference_records = uninterrupted_run(tmp_path / "uninterrupted", "pmap")
    workdir, log_path = tmp_path / "run", tmp_path / "log.txt"
    with training_process(workdir, log_path, parallel="pmap") as process:
        wait_until(lambda: 7 in saved_steps(workdir), process, log_path)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=TIMEOUT_S) == -signal.SIGKILL
    killed_at = saved_steps(workdir)[-1]
    assert killed_at % STEPS_PER_EPOCH and killed_at < TOTAL_STEPS, "the kill should land in the middle of epoch 2"

    state, records, lines = resume(workdir, "pmap", fake_data)
    assert lines[0].startswith(f"resuming from the checkpoint of step {killed_at} ")
    assert_same_state(state, reference_state)
    assert deterministic(outputs.read_metrics(str(workdir))) == deterministic(records) == deterministic(reference_records)


def test_a_first_ctrl_c_finishes_the_step_saves_and_says_how_to_resume(tmp_path):
    workdir, log_path = tmp_path / "run", tmp_path / "log.txt"
    with training_process(workdir, log_path, parallel="jit", checkpoint_every_steps=0) as process:
        wait_until(lambda: "compiled the train and eval steps" in log_path.read_text(), process, log_path)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=TIMEOUT_S) == 130, log_path.read_text()
    last_line = log_path.read_text().strip().splitlines()[-1]
    match = re.fullmatch(
        rf"fake_data_train.py: stopped by SIGINT after step (\d+): saved a checkpoint in "
        rf"{re.escape(str(workdir / CHECKPOINT_DIR))}; run the same command to resume", last_line
    )
    assert match, log_path.read_text()
    assert saved_steps(workdir)[-1] == int(match[1]) < TOTAL_STEPS
    assert "Traceback" not in log_path.read_text()


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
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=2.0) == 130, log_path.read_text()
    assert log_path.read_text().splitlines()[-1] == (
        f"fake_data_train.py: stopped at once by a second SIGINT: the checkpoint of step 2 in "
        f"{workdir / CHECKPOINT_DIR} is kept; run the same command to resume from it")
    assert saved_steps(workdir) == [2]


def test_sigterm_stops_like_a_first_ctrl_c_and_the_usual_handlers_come_back(fake_data, tmp_path):
    handlers = [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)]
    train_batches = input_pipeline.train_batches

    def batches_with_sigterm_before_the_second(*args, **kwargs):
        for index, batch in enumerate(train_batches(*args, **kwargs)):
            if index == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    with fake_data(NUM_EXAMPLES), pytest.raises(Interrupted) as stop, mock.patch.object(
        input_pipeline, "train_batches", batches_with_sigterm_before_the_second
    ):
        trainer.train_and_evaluate(config(parallel="jit", checkpoint_every_steps=0), str(tmp_path), log=lambda line: None)
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert str(stop.value) == (f"stopped by SIGTERM after step 2: saved a checkpoint in {tmp_path / CHECKPOINT_DIR}; "
                               f"run the same command to resume")
    assert saved_steps(tmp_path) == [2]
    assert [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)] == handlers


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_sigterm_or_sighup_before_training_starts_ends_the_run_in_one_line(fake_data, tmp_path, capsys, signum):
    """A scheduler's SIGTERM, or a closed terminal's SIGHUP, while the data loads: nothing to save yet."""
    def load_with_a_signal(config):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal should have ended the run")

    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)]
    with fake_data(NUM_EXAMPLES), mock.patch("nin_jax.data.dataset.load_datasets", load_with_a_signal), \
            pytest.raises(SystemExit) as exit_status:
        train.main([*flags(parallel="jit"), f"--workdir={tmp_path}"])
    assert exit_status.value.code == 128 + signum
    name = signal.Signals(signum).name
    assert capsys.readouterr().err == (f"{os.path.basename(sys.argv[0])}: interrupted by {name}; the same command "
                                       f"resumes from the latest checkpoint, if any\n")
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)] == handlers


def test_a_second_sigterm_during_training_stops_at_once_in_one_line_and_keeps_the_checkpoints(fake_data, tmp_path,
                                                                                              capsys):
    """A scheduler that sends SIGTERM twice: the second does not wait for the save the first asked for."""
    train_batches = input_pipeline.train_batches

    def batches_with_two_sigterms_before_the_fourth(*args, **kwargs):
        for index, batch in enumerate(train_batches(*args, **kwargs)):
            if index == 3:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    with fake_data(NUM_EXAMPLES), mock.patch.object(input_pipeline, "train_batches",
                                                    batches_with_two_sigterms_before_the_fourth), \
            pytest.raises(SystemExit) as exit_status:
        train.main([*flags(parallel="jit"), f"--workdir={tmp_path}"])
    assert exit_status.value.code == 128 + signal.SIGTERM
    prog = os.path.basename(sys.argv[0])
    assert capsys.readouterr().err == (
        f"{prog}: stopping after step 4 (SIGTERM), then saving; send SIGTERM again to stop now without saving this step\n"
        f"{prog}: stopped at once by a second SIGTERM: the checkpoint of step 3 in {tmp_path / CHECKPOINT_DIR} is "
        f"kept; run the same command to resume from it\n")
    assert saved_steps(tmp_path) == [1, 2, 3]  # every step before the signals, each checkpointed whole


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(fake_data, tmp_path, capsys):
    with fake_data(NUM_EXAMPLES), pytest.raises(SystemExit) as exit_status:
        train.main([*flags(parallel="jit", learning_rate=1e6), f"--workdir={tmp_path}"])
    assert exit_status.value.code == 1
    error = capsys.readouterr().err.strip()
    match = re.fullmatch(r"\S+: error: the training loss is (nan|inf) at step (\d+) \(epoch 1, batch \d\): "
                         r"the learning rate 1e\+06 is likely too high; [^\n]*", error)
    assert match, error
    bad_step = int(match[2])
    assert saved_steps(tmp_path)[-1] == bad_step - 1  # every step before the bad one was checkpointed
    last_good = latest_checkpoint(tmp_path, learning_rate=1e6)
    assert int(last_good.step) == bad_step - 1
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(last_good.params))


def test_deterministic_sets_xlas_flag_before_jax_starts_and_leaves_a_cpu_run_as_it_was(tmp_path):
    """On a CPU the flag changes no kernel: the same parameters and metrics, bit for bit. The run
    with --deterministic passing at all shows train.py set the flag (the trainer refuses otherwise)."""
    runs = {}
    for name, extra in (("plain", []), ("deterministic", ["--deterministic"])):
        workdir = tmp_path / name
        result = subprocess.run([sys.executable, HELPER, str(NUM_EXAMPLES), *flags(parallel="jit", num_epochs=1),
                                 f"--workdir={workdir}", *extra], capture_output=True, text=True, timeout=TIMEOUT_S,
                                env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
        assert result.returncode == 0, result.stderr
        runs[name] = (latest_checkpoint(workdir, num_epochs=1), deterministic(outputs.read_metrics(str(workdir))))
    assert_same_state(runs["plain"][0], runs["deterministic"][0])
    assert runs["plain"][1] == runs["deterministic"][1]


def test_deterministic_without_the_flag_in_xla_flags_is_refused(monkeypatch, tmp_path):
    from nin_jax.ops import choices
    from nin_jax.config import ConfigError

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    with pytest.raises(ConfigError, match=r"^--deterministic needs --xla_gpu_deterministic_ops=true in XLA_FLAGS"):
        trainer.train_and_evaluate(config(deterministic=True), str(tmp_path))
    choices.make_deterministic()
    choices.make_deterministic()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_gpu_deterministic_ops=true"
    assert os.listdir(tmp_path) == []  # refused before anything was written
