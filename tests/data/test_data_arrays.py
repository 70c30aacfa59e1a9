"""Fashion-MNIST as .npz arrays (nin_jax/data/data_arrays.py): --data_arrays read or refused in one
line, and the copy of tfds' arrays kept beside its build, read without TensorFlow."""

import io
import json
import os
import shutil

import numpy as np
import pytest

from nin_jax import input_pipeline
from nin_jax.data import data_arrays, dataset
from nin_jax.runtime import errors

from conftest import NEEDS_SHARED_FASHION_MNIST, make_special_file, returns_within


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


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_data_arrays_that_are_not_a_regular_file_are_refused_without_blocking(tmp_path, kind):
    """A FIFO with no writer had blocked train.py for good, deaf to SIGTERM."""
    make_special_file(tmp_path / "arrays.npz", kind)
    with pytest.raises(errors.DataError) as refusal:
        returns_within(lambda: data_arrays.load(str(tmp_path / "arrays.npz")))
    assert str(refusal.value).startswith(f"cannot read Fashion-MNIST arrays from --data_arrays {tmp_path / 'arrays.npz'} "
                                         f"(Is a {'FIFO' if kind == 'fifo' else kind}, not a regular file); write it with")


def npz_declaring(path, name: str, shape: tuple) -> None:
    """splits_arrays() in an .npz whose array `name` has a header declaring `shape`, over the data it has."""
    import zipfile

    np.savez(path, **splits_arrays())
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    array = splits_arrays()[name]
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {**np.lib.format.header_data_from_array_1_0(array), "shape": shape})
    members[f"{name}.npy"] = header.getvalue() + array.tobytes()
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)


def test_an_npz_whose_header_declares_more_images_than_it_holds_is_called_damaged_not_out_of_memory(tmp_path):
    npz_declaring(tmp_path / "arrays.npz", "train_images", (10**12, 28, 28, 1))
    with pytest.raises(errors.DataError) as refusal:
        data_arrays.load(str(tmp_path / "arrays.npz"))
    assert str(refusal.value).startswith(
        f"cannot read Fashion-MNIST arrays from --data_arrays {tmp_path / 'arrays.npz'} (train_images declares shape "
        f"(1000000000000, 28, 28, 1), 784,000,000,000,000 bytes, but holds 2,352: the file is damaged or crafted); "
        f"write it with")


def test_a_copy_beside_the_build_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    fake_tfds_build(tmp_path, num_examples=12)
    make_special_file(tmp_path / input_pipeline.DATASET / data_arrays.FILE_NAME, "fifo")
    with pytest.raises(errors.DataError) as refusal:
        returns_within(lambda: data_arrays.read_copy(str(tmp_path / input_pipeline.DATASET)))
    assert str(refusal.value) == (f"cannot read {tmp_path / input_pipeline.DATASET / data_arrays.FILE_NAME}: Is a FIFO, "
                                  f"not a regular file; remove it, and the next run writes the copy anew")


def test_integer_labels_of_any_width_are_read_as_int32(tmp_path):
    np.savez(tmp_path / "arrays.npz", **splits_arrays(train_labels=np.array([0, 9], np.uint8)))
    loaded = data_arrays.load(str(tmp_path / "arrays.npz"))
    assert loaded["train"].labels.dtype == np.int32 and list(loaded["train"].labels) == [0, 9]


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


@NEEDS_SHARED_FASHION_MNIST
def test_the_copy_beside_the_build_holds_what_tfds_reads(data_dir, monkeypatch):
    """The fixture's load left the uncompressed copy; reading tfds itself gives the same arrays."""
    assert data_arrays.load_copy(os.path.join(data_dir, input_pipeline.DATASET)) is not None
    from_copy = dataset.load_fashion_mnist(data_dir=data_dir)
    monkeypatch.setattr(data_arrays, "load_copy", lambda dataset_dir: None)
    from_tfds = dataset.load_fashion_mnist(data_dir=data_dir)
    for split in input_pipeline.SPLITS:
        for name in ("images", "labels"):
            np.testing.assert_array_equal(getattr(from_copy[split], name), getattr(from_tfds[split], name), strict=True)


@NEEDS_SHARED_FASHION_MNIST
def test_a_truncated_record_of_the_tfds_build_is_one_line_naming_the_folder_to_move_away(data_dir, tmp_path):
    """A record cut short (a full disk or a copy that stopped) raised TensorFlow's DataLossError
    with its traceback; it is a DataError, whose line names the folder and how to build it anew."""
    shutil.copytree(os.path.join(data_dir, input_pipeline.DATASET), tmp_path / input_pipeline.DATASET,
                    ignore=shutil.ignore_patterns(data_arrays.FILE_NAME))  # the copy would be read instead
    (record,) = (tmp_path / input_pipeline.DATASET).glob("*/*-test.tfrecord-00000-of-00001")
    os.truncate(record, record.stat().st_size - 1000)
    dataset_dir = tmp_path / input_pipeline.DATASET
    with pytest.raises(errors.DataError) as error:
        dataset.load_fashion_mnist(data_dir=str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"the Fashion-MNIST that tfds built in {tmp_path} cannot be read (") and "\n" not in message
    assert message.endswith(f"); move {dataset_dir} away and run again to build it anew")
