"""Nothing outside the workdir, the data folder and the compile cache is written, and nothing is
written through a link planted inside them."""

import os

import pytest

from nin_jax import dataset
from nin_jax.errors import DataError

from test_benchmarks import random_arrays
from test_train import run_cli

PRECIOUS = "a file of someone else's, outside the workdir\n"


@pytest.fixture
def precious(tmp_path):
    """A file that a planted link points at: it must come out as it went in."""
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_text(PRECIOUS)
    return path


def test_a_link_planted_at_the_workdir_lock_is_refused_and_its_target_kept(tmp_path, precious):
    workdir, data = tmp_path / "run", tmp_path / "arrays.npz"
    random_arrays(data, 16, 8)
    workdir.mkdir()
    (workdir / "run.lock").symlink_to(precious)
    result = run_cli("--data_arrays", str(data), "--resize", "67", "--batch_size", "8", "--num_epochs", "2",
                     "--compile_cache", "off", "--workdir", str(workdir))
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"train.py: error: cannot write to --workdir {workdir}: {workdir / 'run.lock'} is a "
                             f"link or not a plain file, which nin_jax never writes to; remove it\n")
    assert precious.read_text() == PRECIOUS


def test_a_hard_link_at_the_data_folder_lock_is_refused_and_its_target_kept(tmp_path, precious):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.link(precious, data_dir / "fashion_mnist.lock")
    with pytest.raises(DataError, match=f"^cannot write to --data_dir {data_dir} to build Fashion-MNIST there: "
                                        f"{data_dir / 'fashion_mnist.lock'} is a link or not a plain file"):
        with dataset._build_lock(str(data_dir)):
            pass
    assert precious.read_text() == PRECIOUS


def test_a_symbolic_link_at_the_data_folder_lock_is_refused_and_its_target_kept(tmp_path, precious):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "fashion_mnist.lock").symlink_to(precious)
    with pytest.raises(DataError, match="fashion_mnist.lock is a link or not a plain file"):
        with dataset._build_lock(str(data_dir)):
            pass
    assert precious.read_text() == PRECIOUS
