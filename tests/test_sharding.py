"""`--parallel sharding` end to end: `train_and_evaluate` on 4 fake CPU devices trains, evaluates a
padded last batch and resumes from a checkpoint exactly as `--parallel jit` does on one device."""

import dataclasses

import jax
import numpy as np

from nin_jax import trainer
from nin_jax.config import Config

NUM_EXAMPLES = 40
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
