"""The suite runs on the CPU, whatever accelerator the machine has, with four fake CPU devices for
the pmap and sharding tests, and a compilation cache shared by the test run and the training
processes it starts; all must be set before JAX starts.

Tests marked `accelerator` (tests/test_accelerator.py) run only where JAX finds a GPU or TPU; they
run their checks in processes without the CPU pin."""

import atexit
import dataclasses
import os
import shutil
import tempfile

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # a test may start processes with fewer
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"  # tests that expect '4 cpu devices' pass on a machine with a GPU too
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # each compile of NiN's steps takes seconds on a CPU
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nin_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import contextlib  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_FASHION_MNIST = os.path.join(REPO_ROOT, "..", "shared", "data", "fashion_mnist")


@contextlib.contextmanager
def mock_fashion_mnist(num_examples: int):
    """tfds' random stand-in for Fashion-MNIST: `num_examples` random images per split, read from
    tfds even where a copy of a real build lies in the data dir (`nin_jax.data.data_arrays`)."""
    import tensorflow_datasets as tfds

    from nin_jax.data import data_arrays

    with tfds.testing.mock_data(num_examples=num_examples), mock.patch.object(
        tfds.core.DatasetBuilder, "is_prepared", return_value=True
    ), mock.patch.object(data_arrays, "read_copy", return_value=None):
        yield


@contextlib.contextmanager
def fake_fashion_mnist(num_examples: int):
    """Random uint8 images and labels in place of the tfds dataset, the same in every process;
    faster than `mock_fashion_mnist` for tests of the training loop, which do not need tfds."""
    import numpy as np

    from nin_jax.data import dataset
    from nin_jax import input_pipeline

    rng = np.random.default_rng(0)
    datasets = {
        split: input_pipeline.Split(
            rng.integers(0, 256, (num_examples, 28, 28, 1), dtype=np.uint8),
            rng.integers(0, input_pipeline.NUM_CLASSES, num_examples, dtype=np.int32),
        )
        for split in ("train", "test")
    }
    with mock.patch.object(dataset, "load_fashion_mnist", return_value=datasets):
        yield


def make_strategy(kind, config, devices=None):
    """The strategy of `runtime.parallel` that `kind` names (jit, pmap, sharding, or auto: the
    trainer's choice), for the loop steps of `config`, as the trainer makes it."""
    from nin_jax import trainer
    from nin_jax.runtime import parallel

    config = config if kind == "auto" else dataclasses.replace(config, parallel=kind)
    return parallel.create_strategy(config, trainer.loop_steps(config), devices)


def one_train_step(strategy, state, batch):
    """One train step on its own, through the loop's call: the new state and the step's metric sums."""
    state, carry = strategy.train_step(state, strategy.zero_carry(), batch)
    return state, carry["metrics"]


def one_eval_step(strategy, state, batch):
    """The metric sums of one eval step on its own."""
    return strategy.eval_step(state, strategy.zero_totals(), batch)


def float64():
    """A context in which JAX computes in float64: `jax.enable_x64` where JAX has it (0.10 and 0.12
    do), `jax.experimental.enable_x64` where it does not (the oldest supported JAX, 0.7.2)."""
    import jax

    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64(True)


def pytest_configure(config):
    config.addinivalue_line("markers", "accelerator: runs only where JAX finds a GPU or TPU (tests/test_accelerator.py)")


def pytest_collection_modifyitems(config, items):
    accelerator_items = [item for item in items if "accelerator" in item.keywords]
    if not accelerator_items:
        return
    from accelerator import accelerator_platform

    platform = accelerator_platform()
    if platform is None:
        skip = pytest.mark.skip(reason="no accelerator: JAX finds only a CPU on this machine")
        for item in accelerator_items:
            item.add_marker(skip)


@pytest.fixture
def mock_data():
    return mock_fashion_mnist


@pytest.fixture
def fake_data():
    return fake_fashion_mnist
