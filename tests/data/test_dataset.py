"""Fashion-MNIST from tfds (nin_jax/data/dataset.py): mock data, missing, damaged or truncated
files named in one line, and a dead network said at once."""

import os
import shutil

import chex
import numpy as np
import pytest

from nin_jax import input_pipeline
from nin_jax.data import dataset
from nin_jax.runtime import errors

from conftest import NEEDS_SHARED_FASHION_MNIST, SHARED_FASHION_MNIST


def test_load_from_tfds_mock_data(mock_data):
    with mock_data(num_examples=12):
        datasets = dataset.load_fashion_mnist(data_dir="/nonexistent")
    for name in ("train", "test"):
        split = datasets[name]
        assert len(split) == 12
        chex.assert_shape(split.images, (12, 28, 28, 1))
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        assert split.labels.min() >= 0 and split.labels.max() < input_pipeline.NUM_CLASSES


def test_missing_data_names_the_four_files_and_where_to_put_them(tmp_path):
    with pytest.raises(errors.DataError) as error:
        dataset.load_fashion_mnist(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "empty"))
    message = str(error.value)
    for name in input_pipeline.SOURCE_FILES:
        assert name in message
    assert str(tmp_path / "tfds" / "downloads" / "manual") in message and "--manual_dir" in message


def test_a_damaged_data_file_is_named_before_tfds_builds_anything(tmp_path):
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    for name in input_pipeline.SOURCE_FILES:
        (manual_dir / name).write_bytes(b"not the published file")
    with pytest.raises(errors.DataError) as error:
        dataset.load_fashion_mnist(data_dir=str(tmp_path / "tfds"), manual_dir=str(manual_dir))
    message = str(error.value)
    assert message.startswith("4 Fashion-MNIST files damaged or altered, with another SHA-256 than the published one: ")
    assert f"{manual_dir / 'train-labels-idx1-ubyte.gz'} (22 bytes, the original has 29,515)" in message
    assert len(message.splitlines()) == 1


def test_download_with_a_dead_network_is_one_line_at_once(tmp_path, monkeypatch):
    """tfds' own retries take minutes; the servers are tried first, briefly."""
    import socket

    def no_network(address, timeout=None):
        raise OSError(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(errors.DataError, match=r"^--download cannot reach \S+ \(Temporary failure in name resolution\)"
                       r": the network is down or blocked here\. Put the four files") as error:
        dataset.load_fashion_mnist(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "empty"), download=True)
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "tfds" / input_pipeline.DATASET / "3.0.1")  # nothing was built


@NEEDS_SHARED_FASHION_MNIST
def test_a_truncated_file_is_named_in_one_line(tmp_path):
    manual_dir = tmp_path / "manual"
    shutil.copytree(SHARED_FASHION_MNIST, manual_dir)
    labels = manual_dir / "t10k-labels-idx1-ubyte.gz"
    os.truncate(labels, 1000)
    with pytest.raises(errors.DataError) as error:
        dataset.load_fashion_mnist(data_dir=str(tmp_path / "tfds"), manual_dir=str(manual_dir))
    assert str(error.value) == (
        f"a Fashion-MNIST file damaged or altered, with another SHA-256 than the published one: {labels} "
        f"(1,000 bytes, the original has 5,148). Replace it with the original and run again."
    )
