"""Batching, padding, shuffling, preprocessing and loading of Fashion-MNIST."""

import json
import os
import re

import chex
import jax
import numpy as np
import pytest

from nin_jax.data import data_arrays, dataset
from nin_jax.runtime import distributed, errors, parallel
from nin_jax import input_pipeline, steps, trainer
from nin_jax.config import Config

from conftest import make_strategy


def numbered_split(num_examples: int) -> input_pipeline.Split:
    """Image i is filled with the value i % 251 + 1 and labelled i % 10, so batches can be traced back."""
    ids = np.arange(num_examples)
    images = np.broadcast_to((ids % 251 + 1).astype(np.uint8)[:, None, None, None], (num_examples, 28, 28, 1))
    return input_pipeline.Split(np.array(images), (ids % 10).astype(np.int32))


@pytest.mark.parametrize("num_examples, batch_size", [(10, 4), (12, 4), (1, 8), (129, 128)])
def test_eval_batches_cover_every_example_once_and_mask_the_padding(num_examples, batch_size):
    batches = list(input_pipeline.eval_batches(numbered_split(num_examples), batch_size))
    assert len(batches) == input_pipeline.num_batches(num_examples, batch_size)
    for batch in batches:
        chex.assert_shape([batch["image"], batch["label"], batch["mask"]], [(batch_size, 28, 28, 1), (batch_size,), (batch_size,)])
    mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
    assert mask.sum() == num_examples
    values = np.concatenate([b["image"][:, 0, 0, 0] for b in batches])[mask]
    np.testing.assert_array_equal(values, np.arange(num_examples) % 251 + 1)
    assert not np.concatenate([b["image"] for b in batches])[~mask].any()  # padding is blank


def test_train_batches_are_a_fresh_permutation_each_epoch_and_reproducible():
    split = numbered_split(50)

    def order(seed, epoch, start_batch=0):
        batches = list(input_pipeline.train_batches(split, 8, seed, epoch, start_batch))
        mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
        return np.concatenate([b["image"][:, 0, 0, 0] for b in batches])[mask]

    epoch1 = order(0, 1)
    assert sorted(epoch1) == sorted(np.arange(50) % 251 + 1)
    np.testing.assert_array_equal(epoch1, order(0, 1))
    assert not np.array_equal(epoch1, order(0, 2))
    assert not np.array_equal(epoch1, order(1, 1))
    np.testing.assert_array_equal(order(0, 1, start_batch=3), epoch1[24:])


def test_labels_stay_with_their_images():
    for batch in input_pipeline.train_batches(numbered_split(30), 7, seed=0, epoch=1):
        real = batch["mask"].astype(bool)
        ids = batch["image"][real, 0, 0, 0].astype(int) - 1
        np.testing.assert_array_equal(batch["label"][real], ids % 10)


def test_preprocess_scales_to_unit_range_and_resizes_bilinearly():
    images = np.zeros((2, 28, 28, 1), np.uint8)
    images[0] = 255
    images[1, :, 14:] = 255
    out = steps.preprocess(images, 96)
    chex.assert_shape(out, (2, 96, 96, 1))
    np.testing.assert_allclose(out[0], 1.0)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    edge = np.asarray(out[1, 0, 45:51, 0])
    assert np.all(np.diff(edge) >= 0) and 0 < edge[2] < 1  # a bilinear ramp, not a hard nearest-neighbour edge


def test_preprocess_in_bfloat16_resizes_in_bfloat16_to_within_its_rounding_of_float32():
    """bf16 images are resized in bf16 (the GPU's bf16 units, not float32 dots at the highest
    precision): within bf16's rounding of the float32 resize, whose every value is as before. The
    images, the first product and the second are each rounded to bf16, and jax 0.12 on a CPU adds
    up bf16 products in bf16: within 3 bf16 steps at 1 (2^-8 each)."""
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    fp32 = np.asarray(steps.preprocess(images, 96))
    before = jax.image.resize(images.astype(np.float32) / 255.0, (4, 96, 96, 1), "bilinear")
    np.testing.assert_array_equal(fp32, before)
    bf16 = steps.preprocess(images, 96, jax.numpy.bfloat16)
    assert bf16.dtype == jax.numpy.bfloat16
    lowered = jax.jit(steps.preprocess, static_argnums=(1, 2)).lower(images, 96, jax.numpy.bfloat16).as_text()
    assert "dot_general" in lowered and not re.search(r"dot_general[^\n]*-> tensor<[^\n]*f32>", lowered)
    np.testing.assert_allclose(np.asarray(bf16, np.float32), fp32, atol=3 * 2**-8)


@pytest.mark.parametrize("num_examples, batch_size, num_devices", [(1, 8, 1), (37, 8, 2), (129, 16, 4), (10, 4, 4)])
def test_evaluation_counts_every_example_exactly_once(num_examples, batch_size, num_devices):
    config = Config(resize=67, batch_size=batch_size)
    strategy = (
        make_strategy("jit", config) if num_devices == 1 else make_strategy("pmap", config, jax.local_devices()[:num_devices])
    )
    state = strategy.put_state(steps.create_train_state(config))
    result = trainer.evaluate(strategy, state, numbered_split(num_examples), batch_size)
    assert result["examples"] == num_examples
    assert 0.0 <= result["accuracy"] <= 1.0


def test_take_limits_the_examples():
    split = numbered_split(20)
    assert len(split.take(0)) == 20 and len(split.take(7)) == 7 and len(split.take(50)) == 20


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


@pytest.mark.parametrize("num_processes", [2, 4])
def test_processes_read_disjoint_slices_that_make_up_the_global_batch(num_processes):
    split = numbered_split(45)
    whole = list(input_pipeline.train_batches(split, 8, seed=3, epoch=2))
    parts = [
        list(input_pipeline.train_batches(split, 8, seed=3, epoch=2, process=distributed.ProcessSlice(i, num_processes)))
        for i in range(num_processes)
    ]
    for step, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([part[step][key] for part in parts]), batch[key])
    eval_parts = [list(input_pipeline.eval_batches(split, 8, distributed.ProcessSlice(i, num_processes)))
                  for i in range(num_processes)]
    assert sum(b["mask"].sum() for part in eval_parts for b in part) == 45


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


def splits_arrays(train_labels=(0, 1, 9), test_labels=(3, 4)) -> dict[str, np.ndarray]:
    """What export_arrays writes, for splits of len(labels) blank images with these labels."""
    labels = {"train": np.asarray(train_labels), "test": np.asarray(test_labels)}
    return {**{f"{split}_images": np.zeros((len(labels[split]), 28, 28, 1), np.uint8) for split in labels},
            **{f"{split}_labels": labels[split] for split in labels}}


def good_npz_bytes(tmp_path) -> bytes:
    np.savez(tmp_path / "good.npz", **splits_arrays())
    return (tmp_path / "good.npz").read_bytes()


@pytest.mark.parametrize("content, message", [
    (None, "No such file"),
    (b"not an npz", "cannot read Fashion-MNIST arrays"),
    (b"", "(the file is empty)"),
    ("truncated", "cannot read Fashion-MNIST arrays"),
    ("npy", "is not an .npz of named arrays"),
    ({"train_images": np.zeros((3, 28, 28, 1), np.uint8)}, "KeyError"),
    ({f"{s}_{n}": np.zeros((3, 28, 28) if n == "images" else 3, np.uint8) for s in ("train", "test")
      for n in ("images", "labels")}, "the train split holds images of shape (3, 28, 28)"),
    (splits_arrays(train_labels=(0, 10)), "the train split's labels run from 0 to 10, not within 0 to 9"),
    (splits_arrays(train_labels=(-1, 3)), "the train split's labels run from -1 to 3, not within 0 to 9"),
    (splits_arrays(test_labels=(200,)), "the test split's labels run from 200 to 200, not within 0 to 9"),
    (splits_arrays(train_labels=np.array([0.0, 1.0])), "the train split's labels are float64, not integers"),
    (splits_arrays(test_labels=np.zeros(0, np.int32)), "the test split is empty"),
    (splits_arrays(train_labels=np.zeros(0, np.int32)), "the train split is empty"),
])
def test_bad_data_arrays_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "arrays.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        path.write_bytes(good_npz_bytes(tmp_path)[:300])
    elif content == "npy":
        np.save(path, np.zeros(3))
        (tmp_path / "arrays.npz.npy").rename(path)
    elif content is not None:
        np.savez(path, **content)
    with pytest.raises(errors.DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        data_arrays.load(str(path))
    assert "\n" not in str(error.value)


def test_integer_labels_of_any_width_are_read_as_int32(tmp_path):
    np.savez(tmp_path / "arrays.npz", **splits_arrays(train_labels=np.array([0, 9], np.uint8)))
    loaded = data_arrays.load(str(tmp_path / "arrays.npz"))
    assert loaded["train"].labels.dtype == np.int32 and list(loaded["train"].labels) == [0, 9]


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


def fake_tfds_build(data_dir, num_examples: int) -> str:
    """A folder where tfds' finished build would be; its dataset_info.json, which records
    `num_examples` per split, stands for the build's files."""
    build = data_dir / input_pipeline.DATASET / "3.0.1"
    build.mkdir(parents=True, exist_ok=True)
    splits = [{"name": split, "shardLengths": [str(num_examples)]} for split in input_pipeline.SPLITS]
    (build / "dataset_info.json").write_text(json.dumps({"splits": splits}))
    return str(build / "dataset_info.json")


def without_tfds(monkeypatch):
    def no_tfds():
        raise AssertionError("tfds was imported, though the copy of its arrays should have been read")

    monkeypatch.setattr(dataset, "_import_tfds", no_tfds)


def assert_same_splits(got, expected):
    for split in input_pipeline.SPLITS:
        for name in ("images", "labels"):
            np.testing.assert_array_equal(getattr(got[split], name), getattr(expected[split], name), strict=True)


def test_the_tfds_read_is_kept_as_a_copy_that_later_loads_read_without_tensorflow(mock_data, tmp_path, monkeypatch):
    fake_tfds_build(tmp_path, num_examples=12)
    with mock_data(num_examples=12):
        from_tfds = dataset.load_fashion_mnist(data_dir=str(tmp_path))
    assert data_arrays.FILE_NAME in os.listdir(tmp_path / input_pipeline.DATASET)
    without_tfds(monkeypatch)
    assert_same_splits(dataset.load_fashion_mnist(data_dir=str(tmp_path)), from_tfds)


def rebuild(copy, build_file):
    os.utime(build_file, ns=(1, 1))


def flip_a_byte(copy, build_file):
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 1
    copy.write_bytes(data)


def truncate(copy, build_file):
    os.truncate(copy, copy.stat().st_size // 2)


def foreign(copy, build_file):
    with np.load(copy) as arrays:
        source = arrays["tfds_files"]
    np.savez(copy, train_images=np.zeros((2, 28, 28), np.uint8), tfds_files=source)


@pytest.mark.parametrize("spoil", [rebuild, flip_a_byte, truncate, foreign])
def test_a_stale_or_damaged_copy_is_read_again_from_tfds_and_rewritten(mock_data, tmp_path, monkeypatch, spoil):
    build_file = fake_tfds_build(tmp_path, num_examples=12)
    with mock_data(num_examples=12):
        dataset.load_fashion_mnist(data_dir=str(tmp_path))
    spoil(tmp_path / input_pipeline.DATASET / data_arrays.FILE_NAME, build_file)
    with mock_data(num_examples=12):
        from_tfds = dataset.load_fashion_mnist(data_dir=str(tmp_path))
    assert len(from_tfds["train"]) == 12
    without_tfds(monkeypatch)
    assert_same_splits(dataset.load_fashion_mnist(data_dir=str(tmp_path)), from_tfds)
    assert sorted(os.listdir(tmp_path / input_pipeline.DATASET)) == ["3.0.1", data_arrays.FILE_NAME]  # no temporary left


def test_a_read_that_is_not_the_build_on_disk_is_never_kept_nor_read_as_its_copy(mock_data, tmp_path):
    """tfds' test stand-in, used over a real build, must not leave its few images as that build's copy."""
    fake_tfds_build(tmp_path, num_examples=60_000)
    dataset_dir = str(tmp_path / input_pipeline.DATASET)
    with mock_data(num_examples=12):
        assert len(dataset.load_fashion_mnist(data_dir=str(tmp_path))["train"]) == 12
    assert data_arrays.FILE_NAME not in os.listdir(dataset_dir)
    few = {f"{split}_{name}": np.zeros((12,) + shape, np.uint8)
           for split in input_pipeline.SPLITS for name, shape in (("images", input_pipeline.IMAGE_SHAPE), ("labels", ()))}
    data_arrays.save_copy(dataset_dir, few)
    assert data_arrays.FILE_NAME not in os.listdir(dataset_dir)
    np.savez(os.path.join(dataset_dir, data_arrays.FILE_NAME), **few, tfds_files=data_arrays.tfds_files(dataset_dir))
    assert data_arrays.load_copy(dataset_dir) is None  # a copy left by older code that kept such reads


def test_no_copy_without_a_finished_tfds_build(mock_data, tmp_path):
    (tmp_path / input_pipeline.DATASET / "3.0.1.incomplete1234").mkdir(parents=True)
    with mock_data(num_examples=4):
        dataset.load_fashion_mnist(data_dir=str(tmp_path))
    assert os.listdir(tmp_path / input_pipeline.DATASET) == ["3.0.1.incomplete1234"]


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
