"""An uncompressed copy of the built tfds dataset, kept beside it, that later runs read at once
and without importing TensorFlow, where tfds would decode its records again.

The copy records the names, sizes and modification times of the tfds files it was made from; a
rebuilt dataset changes them, and the copy is then stale. A stale, damaged or foreign copy reads
as None (zip's CRC-32 catches altered bytes), and the caller reads tfds and writes a new one. So
does a copy whose splits hold other numbers of examples than the build records: what tfds' test
stand-in (`tfds.testing.mock_data`) returns is never kept as the copy of a real build.
"""

import json
import os
import re
import tempfile
import zipfile
from typing import Optional

import numpy as np

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
        with open(os.path.join(dataset_dir, newest, "dataset_info.json")) as f:
            splits = json.load(f).get("splits", [])
        return {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in splits}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _matches_build(dataset_dir: str, arrays: dict[str, np.ndarray]) -> bool:
    """Whether `arrays` ({split}_labels, ...) hold as many examples per split as the build records."""
    sizes = recorded_sizes(dataset_dir)
    return bool(sizes) and all(
        f"{split}_labels" in arrays and len(arrays[f"{split}_labels"]) == size for split, size in sizes.items())


def load(dataset_dir: str) -> Optional[dict[str, np.ndarray]]:
    """The arrays saved beside the tfds build in `dataset_dir`, or None if there are none, or they
    are stale or damaged."""
    source = tfds_files(dataset_dir)
    if not source:
        return None
    try:
        with np.load(os.path.join(dataset_dir, FILE_NAME)) as saved:
            if str(saved[_SOURCE_KEY]) != source:
                return None
            arrays = {key: saved[key] for key in saved.files if key != _SOURCE_KEY}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    return arrays if _matches_build(dataset_dir, arrays) else None


def save(dataset_dir: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes `arrays` beside the tfds build in `dataset_dir`, atomically: readers see the old file
    or the whole new one. Without a build there, where `arrays` are not what the build records, or
    where the folder is read-only, it writes nothing."""
    source = tfds_files(dataset_dir)
    if not source or not _matches_build(dataset_dir, arrays):
        return
    try:
        file = tempfile.NamedTemporaryFile(dir=dataset_dir, prefix=FILE_NAME, suffix=".tmp", delete=False)
    except OSError:  # a read-only data dir: tfds stays the only copy
        return
    try:
        with file:
            np.savez(file, **arrays, **{_SOURCE_KEY: np.array(source)})
        os.chmod(file.name, 0o644)  # readable like the tfds files beside it
        os.replace(file.name, os.path.join(dataset_dir, FILE_NAME))
    except OSError:  # a full disk, say: the run goes on with what it read from tfds
        pass
    finally:
        if os.path.exists(file.name):
            os.unlink(file.name)
