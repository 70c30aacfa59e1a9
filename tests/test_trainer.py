"""`train_and_evaluate` and `evaluate` (nin_jax/trainer.py): training on mock and fake data, every
example evaluated once, a resume mid-epoch, sharding like jit, and a short run on the real data."""

import dataclasses
import shutil

import jax
import numpy as np
import pytest

from nin_jax import steps, trainer
from nin_jax.config import Config
from nin_jax.run import outputs
from nin_jax.run.checkpoints import CHECKPOINT_DIR

from conftest import (NEEDS_SHARED_FASHION_MNIST, NUM_EXAMPLES, assert_same_state, deterministic, make_strategy,
                      numbered_split, resume, saved_steps, uninterrupted_run)


REQUIRED_FIELDS = {"epoch", "train_loss", "train_accuracy", "test_accuracy", "test_examples", "examples_per_sec", "devices"}


@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_train_and_evaluate_on_mock_data(mock_data, tmp_path, parallel):
    config = Config(resize=67, batch_size=8, num_epochs=2, eval_examples=13, parallel=parallel)
    lines = []
    with mock_data(num_examples=20):
        state, records = trainer.train_and_evaluate(config, str(tmp_path), log=lines.append)
    assert int(state.step) == 2 * 3  # 20 examples in batches of 8: 3 steps per epoch, the last one padded
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert record["train_examples"] == 20 and record["test_examples"] == 13
        assert np.isfinite(record["train_loss"]) and 0 <= record["test_accuracy"] <= 1
    assert records[0]["devices"] == ("4 cpu devices" if parallel == "pmap" else "1 cpu device")
    logged = outputs.read_metrics(str(tmp_path))
    assert logged == records and REQUIRED_FIELDS <= set(logged[0])
    assert lines[-1].startswith("epoch 2/2: loss ") and "images/s on" in lines[-1]


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


# Every option of the strong recipe: momentum, schedule, weight decay, label smoothing and the
# batch-norm running statistics must all continue where they stopped.
STRONG = dict(recipe="strong", learning_rate=0.02, momentum=0.9, nesterov=True, lr_schedule="onecycle",
              warmup_epochs=1.0, weight_decay=5e-4, label_smoothing=0.1, batch_norm=True)


@pytest.mark.parametrize("changes", [{}, STRONG], ids=["reference", "strong_with_every_option"])
def test_resuming_mid_epoch_ends_like_the_uninterrupted_run_and_a_finished_run_stays_finished(fake_data, tmp_path,
                                                                                               changes):
    full_state, full_records = uninterrupted_run(tmp_path, "jit", **changes)
    assert saved_steps(tmp_path) == [8, 9, 10]
    for step in (9, 10):  # as if the run had died after step 8: epoch 2, 3 of 5 batches done
        shutil.rmtree(tmp_path / CHECKPOINT_DIR / str(step))

    state, records, lines = resume(tmp_path, "jit", fake_data, **changes)
    assert lines[0] == f"resuming from the checkpoint of step 8 in {tmp_path / CHECKPOINT_DIR}: epoch 2, batch 4 of 5 is next"
    assert_same_state(state, full_state)
    assert deterministic(outputs.read_metrics(str(tmp_path))) == deterministic(records) == deterministic(full_records)

    state, records, lines = resume(tmp_path, "jit", fake_data, **changes)
    how_to_go_on = ("its --lr_schedule onecycle spans exactly these epochs, so it cannot go on: train a longer run in a "
                    "new --workdir" if changes else "raise --num_epochs to train on")
    assert lines == [f"the run in {tmp_path} is finished: its checkpoint has all 2 epochs (10 steps); {how_to_go_on}"]
    assert_same_state(state, full_state)
    assert deterministic(records) == deterministic(full_records)


# 3 steps of 8 an epoch (2 examples per device), 13 test examples: the last eval batch holds 5 of 8.
# Dropout on: under sharding the masks must be jit's.
SETTINGS = Config(resize=67, batch_size=8, num_epochs=2, train_examples=24, eval_examples=13, dropout_rate=0.5,
                  weight_init="xavier")


def test_sharding_trains_evaluates_and_resumes_like_jit(fake_data, tmp_path):
    quiet = lambda line: None  # noqa: E731
    with fake_data(NUM_EXAMPLES):
        jit_state, jit_records = trainer.train_and_evaluate(dataclasses.replace(SETTINGS, parallel="jit"), log=quiet)
        sharded = dataclasses.replace(SETTINGS, parallel="sharding")
        trainer.train_and_evaluate(dataclasses.replace(sharded, num_epochs=1), str(tmp_path), log=quiet)
        lines = []
        sharded_state, sharded_records = trainer.train_and_evaluate(sharded, str(tmp_path), log=lines.append)
    assert any("resuming from the checkpoint of step 3" in line for line in lines), lines
    assert int(sharded_state.step) == int(jit_state.step) == 6
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           sharded_state.params, jit_state.params)
    assert [r["parallel"] for r in sharded_records] == ["sharding"] * 2
    assert sharded_records[-1]["devices"] == "4 cpu devices"
    for sharded_record, jit_record in zip(sharded_records, jit_records):
        assert sharded_record["train_examples"] == jit_record["train_examples"] == 24
        assert sharded_record["test_examples"] == jit_record["test_examples"] == 13
        for name in ("train_loss", "test_loss", "test_accuracy"):
            np.testing.assert_allclose(sharded_record[name], jit_record[name], rtol=1e-4)


@NEEDS_SHARED_FASHION_MNIST
def test_real_data_short_run_beats_chance_by_far(real_data_run):
    """64 SGD steps of the strong recipe at 131x131 (conftest's REAL_DATA_RUN_FLAGS, which the class
    maps' tests read too; the book's recipe needs twice as many to leave chance behind as clearly)."""
    (record,) = real_data_run["records"]
    assert record["train_examples"] == 2048 and record["test_examples"] == 1000
    assert record["test_accuracy"] > 0.6  # chance is 0.1; this run measured 0.671
