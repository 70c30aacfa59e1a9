"""--profile_steps: a jax.profiler trace of a few training steps in the workdir."""

import glob
import gzip
import json
import os

import pytest

from nin_jax import profiling, trainer
from nin_jax.config import Config

from test_train import run_cli


@pytest.mark.parametrize("profile_steps, traced", [(2, 2), (5, 3)])  # 4 steps: the first is never traced
def test_profile_steps_writes_a_trace_of_the_steps_after_the_first(fake_data, tmp_path, profile_steps, traced):
    config = Config(resize=67, batch_size=8, num_epochs=1, train_examples=32, eval_examples=8, parallel="jit",
                    profile_steps=profile_steps)
    lines = []
    with fake_data(32):
        trainer.train_and_evaluate(config, str(tmp_path), log=lines.append)
    directory = tmp_path / profiling.PROFILE_DIR
    (run,) = glob.glob(str(directory / "plugins" / "profile" / "*"))
    assert glob.glob(os.path.join(run, "*.xplane.pb"))  # what TensorBoard's profile plugin reads
    with gzip.open(os.path.join(run, "perfetto_trace.json.gz")) as f:
        trace = json.load(f)
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any("train_step" in name for name in names)
    assert f"wrote a profile of {traced} training steps to {directory}; view it with" in "\n".join(lines)


def test_profile_steps_without_a_workdir_is_one_line():
    result = run_cli("--profile_steps", "3", "--data_dir", "/nonexistent")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "--profile_steps needs a --workdir to write the trace into" in result.stderr


def test_no_trace_unless_asked(fake_data, tmp_path):
    with fake_data(16):
        trainer.train_and_evaluate(Config(resize=67, batch_size=8, num_epochs=1, parallel="jit"), str(tmp_path),
                                   log=lambda line: None)
    assert profiling.PROFILE_DIR not in os.listdir(tmp_path)
