"""Four fake CPU devices for the pmap tests; they must be set before JAX starts."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_FASHION_MNIST = os.path.join(REPO_ROOT, "..", "shared", "data", "fashion_mnist")


@contextlib.contextmanager
def mock_fashion_mnist(num_examples: int):
    """tfds' random stand-in for Fashion-MNIST: `num_examples` random images per split."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=num_examples), mock.patch.object(
        tfds.core.DatasetBuilder, "is_prepared", return_value=True
    ):
        yield


@pytest.fixture
def mock_data():
    return mock_fashion_mnist
