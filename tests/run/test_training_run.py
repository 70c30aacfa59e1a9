"""A run as a whole (nin_jax/run/training_run.py): killed mid-epoch it resumes to the same
parameters, a non-finite loss stops it, --deterministic, out of memory in one line, outputs that
cannot be written and a read-only workdir refused before it trains."""

import os
import re
import resource
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from nin_jax import steps, trainer
from nin_jax.config import Config
from nin_jax.run import outputs, training_run
from nin_jax.run.checkpoints import Checkpoints
from nin_jax.runtime.errors import OutOfMemory

import train

from conftest import (CPU_ENV, HELPER, NUM_EXAMPLES, SAVE_BOUND_S, SMALL_JIT_JOB, STEPS_PER_EPOCH, TIMEOUT_S,
                      TOTAL_STEPS, assert_same_state, deterministic, fake_run, resume, resume_config, resume_flags,
                      saved_steps, training_process, uninterrupted_run, wait_until, xla_flags)


def latest_checkpoint(workdir, **changes) -> steps.TrainState:
    run_config = resume_config(**changes)
    with Checkpoints(str(workdir), run_config) as checkpoints:
        return checkpoints.restore_latest(steps.create_train_state(run_config)).state


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


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(fake_data, tmp_path, capsys):
    with fake_data(NUM_EXAMPLES), pytest.raises(SystemExit) as exit_status:
        train.main([*resume_flags(parallel="jit", learning_rate=1e6), f"--workdir={tmp_path}"])
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
        result = subprocess.run([sys.executable, HELPER, str(NUM_EXAMPLES), *resume_flags(parallel="jit", num_epochs=1),
                                 f"--workdir={workdir}", *extra], capture_output=True, text=True, timeout=TIMEOUT_S,
                                env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()})
        assert result.returncode == 0, result.stderr
        runs[name] = (latest_checkpoint(workdir, num_epochs=1), deterministic(outputs.read_metrics(str(workdir))))
    assert_same_state(runs["plain"][0], runs["deterministic"][0])
    assert runs["plain"][1] == runs["deterministic"][1]


def test_deterministic_without_the_flag_in_xla_flags_is_refused(monkeypatch, tmp_path):
    from nin_jax.ops import choices
    from nin_jax.config import ConfigError

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    with pytest.raises(ConfigError, match=r"^--deterministic needs --xla_gpu_deterministic_ops=true in XLA_FLAGS"):
        trainer.train_and_evaluate(resume_config(deterministic=True), str(tmp_path))
    choices.make_deterministic()
    choices.make_deterministic()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_gpu_deterministic_ops=true"
    assert os.listdir(tmp_path) == []  # refused before anything was written


ADDRESS_SPACE = 10 << 30  # lets JAX start, but not allocate a step's 16 GB at batch 8192 and 96 px


def test_a_step_that_runs_out_of_memory_ends_in_one_line_naming_batch_resize_and_dtype(tmp_path):
    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    command = [sys.executable, HELPER, "8192", "--resize=96",
               "--batch_size=8192", "--num_epochs=1", "--eval_examples=8", "--parallel=jit", "--compile_cache=off",
               f"--workdir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=CPU_ENV,
                            preexec_fn=limit_memory)
    assert result.returncode == 1, result.stderr
    assert re.fullmatch(r"fake_data_train.py: error: out of memory on the cpu device at --batch_size 8192, "
                        r"--resize 96, --dtype float32 \([A-Z_]+: [^)]*Out of memory allocating \d+ bytes\): "
                        r"use a smaller --batch_size, such as 4096; a checkpoint resumes only at its own --batch_size, "
                        rf"so use a new --workdir if {re.escape(str(tmp_path))} holds one\n", result.stderr), result.stderr
    assert saved_steps(tmp_path) == []


def test_a_host_memory_error_names_the_sizes_and_other_runtime_errors_pass_through():
    config = Config(batch_size=6, resize=67, dtype="bfloat16")
    with pytest.raises(OutOfMemory, match=r"^out of memory on the host at --batch_size 6, --resize 67, --dtype "
                                          r"bfloat16 \(MemoryError\): use a smaller --batch_size, such as 2$"):
        with training_run.out_of_memory_explained(config, num_devices=2, workdir=None):
            raise MemoryError()
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        with training_run.out_of_memory_explained(config, num_devices=1, workdir=None):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")


@pytest.mark.parametrize("name, make, flags, reason", [
    ("profile", "file", ["--profile_steps=3"], "File exists"),
    ("metrics.jsonl", "folder", [], "Is a directory"),
    ("config.json", "folder", [], "Is a directory"),
    ("curves.png", "folder", [], "Is a directory"),
])
def test_an_output_that_cannot_be_written_ends_the_run_before_training_in_one_line(tmp_path, name, make, flags, reason):
    """As a file where W/checkpoints goes always did: `W/profile` as a file ended the run with two
    JaxRuntimeError tracebacks after steps had trained, and nothing was saved."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / name).mkdir() if make == "folder" else (workdir / name).write_text("in the way")
    result = fake_run(*SMALL_JIT_JOB, f"--workdir={workdir}", *flags)
    assert result.returncode == 1, result.stderr.decode()
    assert result.stderr.decode() == (f"fake_data_train.py: error: cannot write to --workdir {workdir}: "
                                      f"{workdir / name}: {reason}\n")
    assert result.stdout.decode() == ""  # nothing compiled, nothing trained
    assert not [step for step in os.listdir(workdir / "checkpoints") if step.isdigit()]


def test_a_read_only_workdir_is_read_by_predict_and_refused_by_train_in_one_line(read_only_run):
    workdir = read_only_run
    result = fake_run("predict", f"--workdir={workdir}", examples=256, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == (f"python -m nin_jax.predict: error: cannot write {workdir / 'predictions.png'}: "
                             f"Read-only file system\n")  # the checkpoint was read: only the picture failed

    result = fake_run("--resize=67", "--batch_size=32", "--num_epochs=2", "--eval_examples=32", "--parallel=jit",
                      "--compile_cache=off", f"--workdir={workdir}", examples=256, text=True, timeout=SAVE_BOUND_S)
    assert result.returncode == 1
    assert result.stderr.startswith(f"fake_data_train.py: error: cannot write to --workdir {workdir}"), result.stderr
    assert result.stderr.endswith(": Read-only file system\n") and result.stderr.count("\n") == 1, result.stderr
