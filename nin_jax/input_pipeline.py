"""Fashion-MNIST from tensorflow-datasets, held in host memory as uint8, batched for the steps.

The whole dataset fits in host memory as uint8, so it is loaded once into NumPy arrays. Batches
leave the host as 28x28 uint8 images, the smallest form; scaling to [0, 1] and the resize to 224x224 happen
on the accelerator inside the jitted step (`steps.preprocess`), which keeps the host out of the way.

Every batch has the configured global size. A short last batch is padded and carries a `mask`
that is 0 on padding, so every example is used exactly once per epoch, in training and in
evaluation, on any number of devices and with a single compiled step.
"""

import contextlib
import dataclasses
import hashlib
import os
import sys
from typing import Iterator, Optional

import numpy as np

from nin_jax import array_cache, locks
from nin_jax.distributed import ProcessSlice
from nin_jax.errors import DataError

DATASET = "fashion_mnist"
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (28, 28, 1)
SPLITS = ("train", "test")
TRAIN_SIZE = 60_000  # examples in the published training split
SOURCE_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Split:
    """One split in host memory: uint8 images [N, 28, 28, 1] and int32 labels [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, num_examples: int) -> "Split":
        """The first `num_examples` examples (0 = all)."""
        if num_examples == 0 or num_examples >= len(self):
            return self
        return Split(self.images[:num_examples], self.labels[:num_examples])


def _default_data_dir() -> str:
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _missing_files(folder: str) -> list[str]:
    return [name for name in SOURCE_FILES if not os.path.isfile(os.path.join(folder, name))]


def import_tensorflow():
    """TensorFlow, for tfds only: quiet, and kept off the GPU memory that JAX needs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # also silences TF's start-up banner
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    return tf


def _import_tfds():
    """tfds builds and reads with TensorFlow, which must be imported the quiet way first."""
    import_tensorflow()
    import tensorflow_datasets as tfds

    return tfds


def load_fashion_mnist(data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                       download: bool = False) -> dict[str, Split]:
    """Loads {'train', 'test'}, building the tfds dataset first if this data_dir lacks it.

    After the first read, an uncompressed copy beside the build (`nin_jax.array_cache`) is read
    instead, without TensorFlow, for as long as the build is unchanged.

    The four original files are taken from `manual_dir`, else from tfds' default manual folder
    (`<data_dir>/downloads/manual`). Only with `download=True` may tfds fetch them from the
    internet; offline, its retries would take minutes before failing.
    """
    data_dir = os.path.expanduser(data_dir) if data_dir else _default_data_dir()
    dataset_dir = os.path.join(data_dir, DATASET)
    copy = _read_copy(dataset_dir)
    if copy:
        return copy
    tfds = _import_tfds()
    if not tfds.builder(DATASET, data_dir=data_dir).is_prepared():
        with _build_lock(data_dir):
            builder = tfds.builder(DATASET, data_dir=data_dir)
            if not builder.is_prepared():  # else another process has built it meanwhile
                _build_from_files(tfds, builder, data_dir, manual_dir, download)
    builder = tfds.builder(DATASET, data_dir=data_dir)
    datasets = {split: _read_split(builder, split) for split in SPLITS}
    array_cache.save(dataset_dir, _as_arrays(datasets))
    return datasets


@contextlib.contextmanager
def _build_lock(data_dir: str) -> Iterator[None]:
    """One build per data_dir at a time: two builds into one folder would collide (tfds renames its
    finished build into place, and the second rename fails). Whoever finds the lock taken says so
    and waits for the build to end."""
    def wait(holder: str) -> None:
        print(f"waiting for {holder}, which is building Fashion-MNIST in {data_dir}", file=sys.stderr, flush=True)

    with contextlib.ExitStack() as stack:
        try:
            os.makedirs(data_dir, exist_ok=True)
            stack.enter_context(locks.exclusive(os.path.join(data_dir, f"{DATASET}.lock"), wait))
        except locks.Unsupported as error:
            locks.warn(f"cannot lock --data_dir {data_dir} ({error.strerror}); two builds there at once would collide")
        except OSError as error:
            raise DataError(f"cannot write to --data_dir {data_dir} to build Fashion-MNIST there: "
                            f"{error.strerror or error}") from error
        yield


def _build_from_files(tfds, builder, data_dir: str, manual_dir: Optional[str], download: bool) -> None:
    """Builds the tfds dataset from the four files in `manual_dir`, else downloads them when allowed."""
    default_manual_dir = os.path.join(data_dir, "downloads", "manual")
    manual_dir = os.path.expanduser(manual_dir) if manual_dir else default_manual_dir
    missing = _missing_files(manual_dir)
    if missing and not download:
        raise DataError(
            f"Fashion-MNIST is not built in {data_dir} and {manual_dir} lacks {', '.join(missing)}. "
            f"Put the four files {', '.join(SOURCE_FILES)} into {default_manual_dir} "
            f"or into a folder named by --manual_dir, or pass --download when online."
        )
    if not missing:
        _check_source_files(builder, manual_dir)
    _build(builder, tfds.download.DownloadConfig(manual_dir=manual_dir))


def load_datasets(config) -> dict[str, Split]:
    """{'train', 'test'} as the config says: from an exported .npz (`--data_arrays`), else from tfds."""
    if config.data_arrays:
        return load_arrays(config.data_arrays)
    return load_fashion_mnist(config.data_dir, config.manual_dir, config.download)


def _as_arrays(datasets: dict[str, Split]) -> dict[str, np.ndarray]:
    return {f"{split}_{name}": getattr(datasets[split], name) for split in SPLITS for name in ("images", "labels")}


def _as_splits(arrays) -> dict[str, Split]:
    """The splits held in `arrays` (as `_as_arrays` names them); a KeyError if one is missing."""
    return {split: Split(arrays[f"{split}_images"], arrays[f"{split}_labels"]) for split in SPLITS}


def _what_is_wrong(datasets: dict[str, Split]) -> Optional[str]:
    """Why these are not Fashion-MNIST's splits as `Split` holds them, or None if they are."""
    for split, data in datasets.items():
        if data.images.dtype != np.uint8 or data.images.shape[1:] != IMAGE_SHAPE or len(data.images) != len(data.labels):
            return (f"the {split} split holds images of shape {data.images.shape} ({data.images.dtype}) and "
                    f"{len(data.labels)} labels, not uint8 28x28x1 images with a label each")
    return None


def _read_copy(dataset_dir: str) -> Optional[dict[str, Split]]:
    """The splits of the uncompressed copy beside the tfds build, or None where there is none that
    is current and whole."""
    arrays = array_cache.load(dataset_dir)
    try:
        datasets = _as_splits(arrays) if arrays else None
    except KeyError:
        return None
    return None if datasets is None or _what_is_wrong(datasets) else datasets


def save_arrays(datasets: dict[str, Split], path: str) -> None:
    """Writes the splits to one compressed .npz, for machines without TensorFlow."""
    np.savez_compressed(path, **_as_arrays(datasets))


def load_arrays(path: str) -> dict[str, Split]:
    """The splits that `save_arrays` wrote; a missing or foreign file is a one-line DataError."""
    try:
        with np.load(os.path.expanduser(path)) as arrays:
            datasets = _as_splits(arrays)
    except (OSError, KeyError, ValueError) as error:
        raise DataError(
            f"cannot read Fashion-MNIST arrays from --data_arrays {path} ({type(error).__name__}: {error}); "
            f"write them with `python -m nin_jax.export_arrays --out {path}` on a machine with tensorflow-datasets"
        ) from error
    problem = _what_is_wrong(datasets)
    if problem:
        raise DataError(f"--data_arrays {path}: {problem}")
    return datasets


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _check_source_files(builder, manual_dir: str) -> None:
    """Compares the four files with the sizes and SHA-256 sums that tfds registers for them. tfds
    checks them too, but its error speaks of a download and spans several lines."""
    published = {info.filename: info for info in builder.url_infos.values()}
    damaged = []
    for name in SOURCE_FILES:
        path = os.path.join(manual_dir, name)
        if _sha256(path) != published[name].checksum:
            damaged.append(f"{path} ({os.path.getsize(path):,} bytes, the original has {int(published[name].size):,})")
    if damaged:
        one = len(damaged) == 1
        raise DataError(
            f"{'a' if one else len(damaged)} Fashion-MNIST file{'' if one else 's'} damaged or altered, with another "
            f"SHA-256 than the published one: {'; '.join(damaged)}. Replace {'it' if one else 'them'} with the "
            f"original{'' if one else 's'} and run again."
        )


def _build(builder, download_config) -> None:
    """Runs tfds' build; a downloaded file with the wrong checksum ends in a one-line DataError."""
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    try:
        builder.download_and_prepare(download_config=download_config)
    except NonMatchingChecksumError as error:
        raise DataError(f"a downloaded Fashion-MNIST file is damaged: {' '.join(str(error).split())}") from error


def _read_split(builder, split: str, chunk: int = 10_000) -> Split:
    import tensorflow_datasets as tfds

    chunks = list(tfds.as_numpy(builder.as_dataset(split=split, batch_size=chunk)))
    return Split(
        np.concatenate([c["image"] for c in chunks]).astype(np.uint8),
        np.concatenate([c["label"] for c in chunks]).astype(np.int32),
    )


def _padded_batch(split: Split, indices: np.ndarray, batch_size: int, process: ProcessSlice) -> Batch:
    """This process's slice of the global batch `indices`, padded to `batch_size` globally."""
    if len(indices) == batch_size:  # every batch but an epoch's last: nothing to pad, one gather per array
        indices = process.of(indices)
        return {"image": split.images.take(indices, axis=0), "label": split.labels.take(indices),
                "mask": np.ones(len(indices), np.float32)}
    mask = process.of(np.arange(batch_size) < len(indices))
    indices = process.of(np.concatenate([indices, np.zeros(batch_size - len(indices), indices.dtype)]))
    return {
        "image": split.images[indices] * mask[:, None, None, None].astype(np.uint8),
        "label": np.where(mask, split.labels[indices], 0).astype(np.int32),
        "mask": mask.astype(np.float32),
    }


def num_batches(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


def train_batches(split: Split, batch_size: int, seed: int, epoch: int, start_batch: int = 0,
                  process: ProcessSlice = ProcessSlice()) -> Iterator[Batch]:
    """The epoch's batches in an order drawn from (seed, epoch): reshuffled every epoch, the same
    on every run and for any number of processes, and resumable from any batch."""
    order = np.random.default_rng([seed, epoch]).permutation(len(split))
    for start in range(start_batch * batch_size, len(split), batch_size):
        yield _padded_batch(split, order[start : start + batch_size], batch_size, process)


def eval_batches(split: Split, batch_size: int, process: ProcessSlice = ProcessSlice()) -> Iterator[Batch]:
    """The split in order; the last batch is padded and masked, never dropped."""
    for start in range(0, len(split), batch_size):
        yield _padded_batch(split, np.arange(start, min(start + batch_size, len(split))), batch_size, process)
