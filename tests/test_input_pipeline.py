"""A split in host memory and its batches (nin_jax/input_pipeline.py): padding, masks, shuffling,
and the slices that the processes of a job read."""

import chex
import numpy as np
import pytest

from nin_jax import input_pipeline
from nin_jax.runtime import distributed

from conftest import numbered_split


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


def test_take_limits_the_examples():
    split = numbered_split(20)
    assert len(split.take(0)) == 20 and len(split.take(7)) == 7 and len(split.take(50)) == 20


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
