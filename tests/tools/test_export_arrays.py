"""`python -m nin_jax.export_arrays` (nin_jax/tools/export_arrays.py): it writes what tfds gives,
whole or not at all, and refuses what it cannot write in one line."""

import os
import subprocess
import sys

import numpy as np
import pytest

from nin_jax import input_pipeline, trainer
from nin_jax.config import Config
from nin_jax.data import data_arrays, dataset

from conftest import CPU_ENV, REPO_ROOT


def test_exported_arrays_train_like_tfds_data_without_tensorflow(mock_data, tmp_path):
    """export_arrays writes what tfds gives; --data_arrays reads it back and trains on it."""
    from nin_jax.tools import export_arrays

    path = str(tmp_path / "fashion_mnist.npz")
    with mock_data(24):
        export_arrays.main(["--out", path, "--data_dir", str(tmp_path / "tfds")])
        from_tfds = dataset.load_fashion_mnist(data_dir=str(tmp_path / "tfds"))
    from_arrays = data_arrays.load(path)
    for split in ("train", "test"):
        np.testing.assert_array_equal(from_arrays[split].images, from_tfds[split].images)
        np.testing.assert_array_equal(from_arrays[split].labels, from_tfds[split].labels)
    config = Config(resize=67, batch_size=8, num_epochs=1, parallel="jit", data_arrays=path, data_dir="/nonexistent")
    _, records = trainer.train_and_evaluate(config, log=lambda line: None)
    assert records[-1]["train_examples"] == records[-1]["test_examples"] == 24


def test_export_arrays_writes_exactly_the_named_file_whole_or_leaves_the_old_one(tmp_path, monkeypatch):
    from nin_jax.tools import export_arrays

    datasets = {
        split: input_pipeline.Split(np.zeros((n, 28, 28, 1), np.uint8), np.arange(n, dtype=np.int32) % 10)
        for split, n in (("train", 5), ("test", 3))}
    monkeypatch.setattr(dataset, "load_fashion_mnist", lambda *args: datasets)
    out = tmp_path / "fashion.npz"
    export_arrays.main(["--out", str(out)])
    assert sorted(os.listdir(tmp_path)) == ["fashion.npz"]
    good = out.read_bytes()

    def cut_short(file, **arrays):  # a kill or a full disk in the middle of the write
        file.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", cut_short)
    with pytest.raises(SystemExit) as exit_:
        export_arrays.main(["--out", str(out)])
    assert exit_.value.code == 1
    assert out.read_bytes() == good and sorted(os.listdir(tmp_path)) == ["fashion.npz"]  # no temporary left


@pytest.mark.parametrize("out, message", [
    ("X", "--out X must end in .npz"),
    ("missing/X.npz", "cannot write missing/X.npz: No such file or directory"),
    ("file/X.npz", "cannot write file/X.npz: Not a directory"),
])
def test_export_arrays_refuses_what_it_cannot_write_in_one_line(tmp_path, monkeypatch, capsys, out, message):
    from nin_jax.tools import export_arrays

    (tmp_path / "file").write_text("")
    monkeypatch.chdir(tmp_path)
    split = input_pipeline.Split(np.zeros((2, 28, 28, 1), np.uint8), np.zeros(2, np.int32))
    monkeypatch.setattr(dataset, "load_fashion_mnist", lambda *args: {"train": split, "test": split})
    with pytest.raises(SystemExit) as exit_:
        export_arrays.main(["--out", out])
    assert exit_.value.code in (1, 2)
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_export_arrays_to_a_read_only_disk_is_refused_before_reading_any_data(read_only_run, tmp_path):
    out = read_only_run / "fashion_mnist.npz"
    result = subprocess.run([sys.executable, "-m", "nin_jax.export_arrays", "--out", str(out), "--data_dir",
                             str(tmp_path / "no_data")], capture_output=True, text=True, timeout=60, env=CPU_ENV,
                            cwd=REPO_ROOT)
    assert result.returncode == 1
    assert result.stderr == f"python -m nin_jax.export_arrays: error: cannot write {out}: Read-only file system\n"
    assert not out.exists()
