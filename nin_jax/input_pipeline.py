"""Fashion-MNIST in host memory (`Split`, the dataset's constants) and the batches the steps take.

The whole dataset fits in host memory as uint8, so it is loaded once into NumPy arrays
(`nin_jax.dataset`). Batches leave the host as 28x28 uint8 images, the smallest form; scaling to
[0, 1] and the resize to 224x224 happen on the accelerator inside the jitted step
(`steps.preprocess`), which keeps the host out of the way.

Every batch has the configured global size. A short last batch is padded and carries a `mask`
that is 0 on padding, so every example is used exactly once per epoch, in training and in
evaluation, on any number of devices and with a single compiled step.
"""

import dataclasses
from typing import Iterator

import numpy as np

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
class ProcessSlice:
    """Which part of every global batch this process loads: with several processes (hosts) each
    reads only its own contiguous slice, and together they read the whole batch."""

    index: int = 0
    count: int = 1

    def of(self, values: np.ndarray) -> np.ndarray:
        size = len(values) // self.count
        return values[self.index * size : (self.index + 1) * size]


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
