"""Checks on the machine's GPU or TPU: one jitted step, bf16 there, an epoch against the CPU's.

They run only where JAX finds an accelerator (`accelerator` marker, see conftest.py), or where
NIN_JAX_ACCELERATOR_STAND_IN=cpu lets the CPU stand in for one (CI does, so that their code runs
on every CI run), and are skipped elsewhere with the reason. Each check runs in a process without
the suite's CPU pin, whose path holds the repository and nothing of the suite.
"""

import json

import numpy as np
import pytest

from nin_jax.data import data_arrays
from nin_jax import input_pipeline

from accelerator import accelerator_platform, run_code, run_python, unpinned_env

pytestmark = pytest.mark.accelerator

# One jitted train step from the same state and batch in float32 and in bfloat16.
STEPS = """
import json, sys
import jax, numpy as np
sys.path.insert(0, "benchmarks")
from common import random_batch
from nin_jax import steps
from nin_jax.config import Config
from nin_jax import trainer
from nin_jax.runtime import parallel

results = {}
for dtype in ("float32", "bfloat16"):
    config = Config(resize=67, batch_size=16, parallel="jit", dtype=dtype, weight_init="xavier")  # every layer learns
    strategy = parallel.create_strategy(config, trainer.loop_steps(config))
    initial = jax.device_get(steps.create_train_state(config))
    state, carry = strategy.train_step(strategy.put_state(initial), strategy.zero_carry(), random_batch(config.batch_size))
    metrics = carry["metrics"]
    params = jax.tree_util.tree_leaves(state.params)
    images = jax.numpy.zeros((2, 67, 67, 1), config.dtype)
    _, intermediates = steps.create_model(config).apply({"params": state.params}, images, mutable=["intermediates"])
    results[dtype] = {
        "platforms": sorted({device.platform for leaf in params for device in leaf.devices()}),
        "loss": float(metrics["loss_sum"] / metrics["count"]),
        "param_dtypes": sorted({str(leaf.dtype) for leaf in params}),
        "activation_dtypes": sorted({str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(intermediates)}),
        "update": [np.asarray(after - before) for after, before in zip(params, jax.tree_util.tree_leaves(initial.params))],
    }
bf16, fp32 = (np.concatenate([u.ravel() for u in results[dtype].pop("update")]) for dtype in ("bfloat16", "float32"))
results["update_difference"] = float(np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def step_results():
    return run_code(STEPS, unpinned_env())


def test_one_jitted_step_runs_on_the_accelerator(step_results):
    fp32 = step_results["float32"]
    assert fp32["platforms"] == [accelerator_platform()]
    assert np.isfinite(fp32["loss"]) and fp32["param_dtypes"] == ["float32"]
    assert fp32["activation_dtypes"] == ["float32"]


def test_bfloat16_step_computes_in_bf16_on_the_accelerator_close_to_float32(step_results):
    bf16, fp32 = step_results["bfloat16"], step_results["float32"]
    assert bf16["platforms"] == [accelerator_platform()]
    assert bf16["activation_dtypes"] == ["bfloat16"] and bf16["param_dtypes"] == ["float32"]
    np.testing.assert_allclose(bf16["loss"], fp32["loss"], rtol=2e-2)
    assert step_results["update_difference"] <= 0.05  # the same step, to bf16's ~3 significant digits


def test_an_epoch_on_the_accelerator_matches_the_cpu_within_tolerance(tmp_path):
    """The same epoch of 4 steps and 100 test images, on the accelerator and on the CPU. float32
    convolutions may round differently there (e.g. TF32 on NVIDIA GPUs), hence the tolerances."""
    rng = np.random.default_rng(0)
    split = lambda n: input_pipeline.Split(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),  # noqa: E731
                                           rng.integers(0, 10, n, dtype=np.int32))
    data = tmp_path / "arrays.npz"
    data_arrays.save({"train": split(256), "test": split(100)}, str(data))
    records = {}
    for name, env in (("accelerator", unpinned_env()), ("cpu", unpinned_env(JAX_PLATFORMS="cpu"))):
        workdir = tmp_path / name
        run_python(["train.py", "--data_arrays", str(data), "--resize", "67", "--batch_size", "64", "--num_epochs", "1",
                    "--parallel", "jit", "--workdir", str(workdir)], env)
        (records[name],) = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    accelerator, cpu = records["accelerator"], records["cpu"]
    assert accelerator["devices"] == f"1 {accelerator_platform()} device" and cpu["devices"] == "1 cpu device"
    assert accelerator["train_examples"] == cpu["train_examples"] == 256
    assert accelerator["test_examples"] == cpu["test_examples"] == 100
    for name in ("train_loss", "test_loss"):
        np.testing.assert_allclose(accelerator[name], cpu[name], rtol=2e-2)
    for name in ("train_accuracy", "test_accuracy"):
        assert abs(accelerator[name] - cpu[name]) <= 0.05
