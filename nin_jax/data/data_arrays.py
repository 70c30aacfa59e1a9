"""The dataset's NumPy copies, as one name for both: the data arrays.

Two files hold them. `--data_arrays F.npz` is one that `python -m nin_jax.export_arrays` wrote,
for machines without TensorFlow (`save`, `load`). The other is kept beside the tfds build, an
uncompressed copy that later runs read at once and without TensorFlow, where tfds would decode
its records again (`save_copy`, `read_copy`).

The copy records the names, sizes and modification times of the tfds files it was made from; a
rebuilt dataset changes them, and the copy is then stale. A stale, damaged or foreign copy reads
as None (zip's CRC-32 catches altered bytes), and the caller reads tfds and writes a new one. So
does a copy whose splits hold other numbers of examples than the build records: what tfds' test
stand-in (`tfds.testing.mock_data`) returns is never kept as the copy of a real build.
"""

import json
import os
import re
import zipfile
from typing import Optional

import numpy as np

from nin_jax.runtime import files
from nin_jax.runtime.errors import DataError, OutputError
from nin_jax.input_pipeline import IMAGE_SHAPE, NUM_CLASSES, SPLITS, Split

FILE_NAME = "nin_jax_arrays.npz"
_SOURCE_KEY = "tfds_files"
_VERSION_FOLDER = re.compile(r"\d+\.\d+\.\d+")  # tfds' finished builds; in-progress ones end in .incomplete...


def tfds_files(dataset_dir: str) -> str:
    """One line per file of every finished tfds build in `dataset_dir`: name, size, modification
    time. Empty when nothing is built there."""
    lines = []
    versions = sorted(os.listdir(dataset_dir)) if os.path.isdir(dataset_dir) else []
    for version in filter(_VERSION_FOLDER.fullmatch, versions):
        with os.scandir(os.path.join(dataset_dir, version)) as entries:
            for entry in sorted(entries, key=lambda entry: entry.name):
                stat = entry.stat()
                lines.append(f"{version}/{entry.name} {stat.st_size} {stat.st_mtime_ns}")
    return "\n".join(lines)


def recorded_sizes(dataset_dir: str) -> dict[str, int]:
    """{split: examples} as the newest finished build's dataset_info.json records them; empty
    where it records none."""
    versions = [v for v in os.listdir(dataset_dir) if _VERSION_FOLDER.fullmatch(v)] if os.path.isdir(dataset_dir) else []
    if not versions:
        return {}
    newest = max(versions, key=lambda v: tuple(map(int, v.split("."))))
    try:
        with files.open_regular(os.path.join(dataset_dir, newest, "dataset_info.json"), "r") as f:
            splits = json.load(f).get("splits", [])
        return {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in splits}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _matches_build(dataset_dir: str, arrays: dict[str, np.ndarray]) -> bool:
    """Whether `arrays` ({split}_labels, ...) hold as many examples per split as the build records."""
    sizes = recorded_sizes(dataset_dir)
    return bool(sizes) and all(
        f"{split}_labels" in arrays and len(arrays[f"{split}_labels"]) == size for split, size in sizes.items())


def load_copy(dataset_dir: str) -> Optional[dict[str, np.ndarray]]:
    """The arrays saved beside the tfds build in `dataset_dir`, or None if there are none, or they
    are stale or damaged."""
    source = tfds_files(dataset_dir)
    if not source:
        return None
    path = os.path.join(dataset_dir, FILE_NAME)
    try:
        with files.open_regular(path) as file, np.load(file) as saved:
            if _declared_beyond_held(saved) or str(saved[_SOURCE_KEY]) != source:
                return None
            arrays = {key: saved[key] for key in saved.files if key != _SOURCE_KEY}
    except files.NotRegularFile as error:
        raise DataError(f"cannot read {path}: {error.strerror}; remove it, and the next run writes the copy anew") from error
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    return arrays if _matches_build(dataset_dir, arrays) else None


def save_copy(dataset_dir: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes `arrays` beside the tfds build in `dataset_dir`, atomically: readers see the old file
    or the whole new one. Without a build there, where `arrays` are not what the build records, or
    where the folder cannot be written (read-only, full), it writes nothing: tfds stays the only copy."""
    source = tfds_files(dataset_dir)
    if not source or not _matches_build(dataset_dir, arrays):
        return
    try:
        with files.replace(os.path.join(dataset_dir, FILE_NAME), "wb") as file:
            np.savez(file, **arrays, **{_SOURCE_KEY: np.array(source)})
    except OutputError:
        pass


def _declared_beyond_held(arrays) -> str:
    """'train_images declares shape (10**12, 28, 28, 1), ... bytes, but holds 2,352' for the first
    array of the opened .npz `arrays` whose header asks for more bytes than its file holds, or '':
    such a header would have NumPy allocate what it declares (terabytes) before reading a byte."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    for info in arrays.zip.infolist():
        with arrays.zip.open(info) as member:
            reader = readers.get(np.lib.format.read_magic(member))
            if reader is None:  # a format this check does not parse: NumPy reads it as ever
                continue
            shape, _, dtype = reader(member)
            declared, held = int(np.prod(shape, dtype=object)) * dtype.itemsize, info.file_size - member.tell()
        if declared > held:
            return (f"{info.filename.removesuffix('.npy')} declares shape {tuple(shape)}, {declared:,} bytes, but "
                    f"holds {held:,}")
    return ""


def as_arrays(datasets: dict[str, Split]) -> dict[str, np.ndarray]:
    return {f"{split}_{name}": getattr(datasets[split], name) for split in SPLITS for name in ("images", "labels")}


def _as_splits(arrays) -> dict[str, Split]:
    """The splits held in `arrays` (as `as_arrays` names them); a KeyError if one is missing."""
    return {split: Split(arrays[f"{split}_images"], arrays[f"{split}_labels"]) for split in SPLITS}


def what_is_wrong(datasets: dict[str, Split]) -> Optional[str]:
    """Why these are not Fashion-MNIST's splits as `Split` holds them, or None if they are: uint8
    28x28x1 images, an integer label from 0 to NUM_CLASSES - 1 for each, and no split empty."""
    for split, data in datasets.items():
        if data.images.dtype != np.uint8 or data.images.shape[1:] != IMAGE_SHAPE or data.labels.ndim != 1 \
                or len(data.images) != len(data.labels):
            return (f"the {split} split holds images of shape {data.images.shape} ({data.images.dtype}) and "
                    f"labels of shape {data.labels.shape}, not uint8 28x28x1 images with one label each")
        if not len(data):
            return f"the {split} split is empty"
        if not np.issubdtype(data.labels.dtype, np.integer):
            return f"the {split} split's labels are {data.labels.dtype}, not integers"
        low, high = int(data.labels.min()), int(data.labels.max())
        if low < 0 or high >= NUM_CLASSES:
            return f"the {split} split's labels run from {low} to {high}, not within 0 to {NUM_CLASSES - 1}"
    return None


def _as_int32_labels(datasets: dict[str, Split]) -> dict[str, Split]:
    return {split: Split(data.images, data.labels.astype(np.int32)) for split, data in datasets.items()}


def read_copy(dataset_dir: str) -> Optional[dict[str, Split]]:
    """The splits of the uncompressed copy beside the tfds build, or None where there is none that
    is current and whole."""
    arrays = load_copy(dataset_dir)
    try:
        datasets = _as_splits(arrays) if arrays else None
    except KeyError:
        return None
    return None if datasets is None or what_is_wrong(datasets) else datasets


def save(datasets: dict[str, Split], path: str) -> None:
    """Writes the splits to one compressed .npz at exactly `path` (NumPy adds no suffix to an open
    file), whole or not at all, for machines without TensorFlow."""
    with files.replace(os.path.expanduser(path), "wb") as file:
        np.savez_compressed(file, **as_arrays(datasets))


def load(path: str) -> dict[str, Split]:
    """The splits that `save` wrote, checked (`what_is_wrong`); a missing, damaged or foreign file
    is a one-line DataError."""
    advice = f"write it with `python -m nin_jax.export_arrays --out {path}` on a machine with tensorflow-datasets"

    def refused(reason: str) -> DataError:
        return DataError(f"cannot read Fashion-MNIST arrays from --data_arrays {path} ({reason}); {advice}")

    try:
        with files.open_regular(os.path.expanduser(path)) as file, np.load(file) as arrays:
            declared = _declared_beyond_held(arrays)
            if declared:
                raise refused(f"{declared}: the file is damaged or crafted")
            datasets = _as_splits(arrays)
    except files.NotRegularFile as error:  # a FIFO would block the read for good
        raise refused(error.strerror) from error
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise refused({EOFError: "the file is empty"}.get(type(error), f"{type(error).__name__}: {error}")) from error
    except (AttributeError, TypeError) as error:  # a .npy: np.load returns one array, not a context manager
        raise DataError(f"--data_arrays {path} is not an .npz of named arrays; {advice}") from error
    problem = what_is_wrong(datasets)
    if problem:
        raise DataError(f"--data_arrays {path}: {problem}")
    return _as_int32_labels(datasets)
