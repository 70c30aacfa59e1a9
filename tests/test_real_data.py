"""A short training run on the real Fashion-MNIST files in ../shared (CI has them)."""

import os
import shutil

import numpy as np
import pytest

from nin_jax.data import data_arrays, dataset
from nin_jax.runtime import errors
from nin_jax import input_pipeline, trainer
from nin_jax.config import Config

from conftest import SHARED_FASHION_MNIST

pytestmark = pytest.mark.skipif(
    not os.path.isdir(SHARED_FASHION_MNIST), reason=f"the Fashion-MNIST files are not in {SHARED_FASHION_MNIST}"
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """tfds builds the dataset from the four files once per test session (about 15 s)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    datasets = dataset.load_fashion_mnist(data_dir=data_dir, manual_dir=SHARED_FASHION_MNIST)
    assert len(datasets["train"]) == 60_000 and len(datasets["test"]) == 10_000
    return data_dir


def test_real_data_short_run_beats_chance_by_far(data_dir, tmp_path):
    """256 SGD steps of the strong recipe at the smallest size NiN takes (about 30 s on 2 cores; the
    book's recipe needs twice as many to leave chance behind as clearly)."""
    config = Config.from_recipe("strong", resize=67, num_epochs=1, batch_size=32, train_examples=8192,
                                eval_examples=2000, parallel="jit", data_dir=data_dir)
    _, records = trainer.train_and_evaluate(config, str(tmp_path), log=print)
    assert records[0]["test_examples"] == 2000
    assert records[0]["test_accuracy"] > 0.6  # chance is 0.1; this run measured 0.797


def test_the_copy_beside_the_build_holds_what_tfds_reads(data_dir, monkeypatch):
    """The fixture's load left the uncompressed copy; reading tfds itself gives the same arrays."""
    assert data_arrays.load_copy(os.path.join(data_dir, input_pipeline.DATASET)) is not None
    from_copy = dataset.load_fashion_mnist(data_dir=data_dir)
    monkeypatch.setattr(data_arrays, "load_copy", lambda dataset_dir: None)
    from_tfds = dataset.load_fashion_mnist(data_dir=data_dir)
    for split in input_pipeline.SPLITS:
        for name in ("images", "labels"):
            np.testing.assert_array_equal(getattr(from_copy[split], name), getattr(from_tfds[split], name), strict=True)


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
