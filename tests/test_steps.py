"""The train and eval steps, under jit, and under pmap and sharding on 2 and 4 fake CPU devices."""

import dataclasses
from unittest import mock

import chex
import jax
import numpy as np
import optax
import pytest

from nin_jax import input_pipeline, steps
from nin_jax.runtime import parallel
from nin_jax.config import Config, ConfigError

from conftest import one_eval_step, one_train_step, make_strategy

CONFIG = Config(resize=67, batch_size=16, dropout_rate=0.0)


def random_batch(batch_size: int, num_real: int, seed: int = 0) -> input_pipeline.Batch:
    rng = np.random.default_rng(seed)
    split = input_pipeline.Split(
        rng.integers(0, 256, (num_real, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, num_real, dtype=np.int32)
    )
    return next(input_pipeline.eval_batches(split, batch_size))


def one_step(strategy, batch):
    state = strategy.put_state(steps.create_train_state(CONFIG))
    state, metrics = one_train_step(strategy, state, batch)
    return strategy.get_state(state), jax.device_get(metrics)


@pytest.mark.parametrize("num_devices", [2, 4])
@pytest.mark.parametrize("num_real", [16, 13])
def test_pmap_step_equals_jit_step(num_devices, num_real):
    """One pmap step over a global batch gives the jit step's parameters, padded batches included."""
    batch = random_batch(CONFIG.batch_size, num_real)
    jit_state, jit_metrics = one_step(make_strategy("jit", CONFIG), batch)
    pmap_state, pmap_metrics = one_step(make_strategy("pmap", CONFIG, jax.local_devices()[:num_devices]), batch)
    assert int(pmap_state.step) == int(jit_state.step) == 1
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), pmap_state.params, jit_state.params
    )
    assert pmap_metrics["count"] == jit_metrics["count"] == num_real
    assert pmap_metrics["loss_sum"].shape == ()  # summed over devices in the step: one value, not one per device
    np.testing.assert_allclose(pmap_metrics["loss_sum"], jit_metrics["loss_sum"], rtol=1e-5)
    assert pmap_metrics["correct"] == jit_metrics["correct"]


def test_sharding_step_equals_pmap_step_over_a_few_steps():
    """`--parallel sharding` (jit over a mesh) and `--parallel pmap` agree step after step."""
    batches = [random_batch(CONFIG.batch_size, num_real, seed) for seed, num_real in enumerate((16, 16, 9))]
    results = []
    for strategy in (make_strategy("pmap", CONFIG), make_strategy("sharding", CONFIG)):
        assert strategy.num_devices == 4
        state = strategy.put_state(steps.create_train_state(CONFIG))
        for batch in batches:
            state, metrics = one_train_step(strategy, state, batch)
        results.append((strategy.get_state(state).params, jax.device_get(metrics)))
    (pmap_params, pmap_metrics), (sharded_params, sharded_metrics) = results
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), pmap_params, sharded_params)
    assert pmap_metrics["count"] == sharded_metrics["count"] == 9
    np.testing.assert_allclose(pmap_metrics["loss_sum"], sharded_metrics["loss_sum"], rtol=1e-5)


def test_train_step_is_sgd_on_the_mean_loss_of_real_examples():
    batch = random_batch(CONFIG.batch_size, num_real=11)
    state = steps.create_train_state(CONFIG)
    images = steps.preprocess(batch["image"][:11], CONFIG.resize)

    def mean_loss(params):
        logits = state.apply_fn({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"][:11]).mean()

    expected_loss, grads = jax.jit(jax.value_and_grad(mean_loss))(state.params)
    expected = jax.tree_util.tree_map(lambda p, g: p - CONFIG.learning_rate * g, state.params, grads)
    new_state, metrics = one_train_step(make_strategy("jit", CONFIG), state, batch)  # donates `state`
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new_state.params, expected)
    np.testing.assert_allclose(metrics["loss_sum"] / metrics["count"], expected_loss, rtol=1e-5)


def test_dropout_masks_follow_the_step():
    """Dropout keys come from (seed, step), not from hidden state: two runs of the same step agree."""
    config = dataclasses.replace(CONFIG, dropout_rate=0.5)
    batch = random_batch(config.batch_size, 16)
    strategy = make_strategy("jit", config)
    first = one_train_step(strategy, steps.create_train_state(config), batch)[0]
    again = one_train_step(strategy, steps.create_train_state(config), batch)[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, first.params, again.params)


def test_eval_step_counts_only_real_examples():
    batch = random_batch(CONFIG.batch_size, num_real=5)
    metrics = one_eval_step(make_strategy("jit", CONFIG), steps.create_train_state(CONFIG), batch)
    assert metrics["count"] == 5
    assert 0 <= metrics["correct"] <= 5


def test_pmap_refuses_a_batch_that_does_not_split_over_the_devices():
    with pytest.raises(ConfigError, match="does not split evenly over 4 devices"):
        make_strategy("pmap", dataclasses.replace(CONFIG, batch_size=18), jax.local_devices()[:4])


def test_auto_picks_sharding_when_there_are_several_devices_and_jit_for_one():
    assert jax.local_device_count() == 4
    assert make_strategy("auto", CONFIG).name == "sharding"
    assert make_strategy("auto", dataclasses.replace(CONFIG, parallel="pmap")).name == "pmap"
    assert make_strategy("auto", dataclasses.replace(CONFIG, parallel="jit")).name == "jit"
    with mock.patch.object(jax, "device_count", return_value=1):
        assert make_strategy("auto", CONFIG).name == "jit"


def test_pmap_state_goes_to_every_device_and_comes_back_unchanged():
    state = steps.create_train_state(CONFIG)
    strategy = make_strategy("pmap", CONFIG)
    placed = strategy.put_state(state)
    kernel = placed.params["block1"]["conv"]["kernel"]
    assert kernel.shape == (4,) + state.params["block1"]["conv"]["kernel"].shape
    assert {shard.device for shard in kernel.addressable_shards} == set(jax.local_devices())
    jax.tree_util.tree_map(np.testing.assert_array_equal, strategy.get_state(placed), jax.device_get(state))


def test_jit_and_sharding_draw_the_same_dropout_masks():
    """Under sharding the step is jit's, with the same key: dropout masks do
    not depend on how the batch is split, so the parameters agree to float rounding. A step from
    another seed's key, the same parameters otherwise, does not."""
    config = dataclasses.replace(CONFIG, dropout_rate=0.5)
    batch = random_batch(config.batch_size, config.batch_size)
    initial = jax.device_get(steps.create_train_state(config))  # host copies: each step donates its input
    other_key = initial.replace(dropout_key=steps.create_train_state(dataclasses.replace(config, seed=1)).dropout_key)
    results = {}
    for name, strategy, state in (("jit", make_strategy("jit", config), initial),
                                  ("sharding", make_strategy("sharding", config), initial),
                                  ("other key", make_strategy("jit", config), other_key)):
        new_state, _ = one_train_step(strategy, strategy.put_state(state), batch)
        results[name] = jax.tree_util.tree_leaves(strategy.get_state(new_state).params)
    for jit_leaf, sharded_leaf in zip(results["jit"], results["sharding"]):
        np.testing.assert_allclose(sharded_leaf, jit_leaf, rtol=1e-4, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(results["jit"], results["other key"])) > 1e-3


def test_bfloat16_step_computes_in_bf16_and_keeps_parameters_optimizer_and_loss_in_float32():
    """Mixed precision: bf16 activations, float32 parameters, updates and loss, close to the fp32 step."""
    batch = random_batch(CONFIG.batch_size, CONFIG.batch_size)
    bf16 = dataclasses.replace(CONFIG, dtype="bfloat16")
    model = steps.create_model(bf16)
    state = steps.create_train_state(bf16)
    images = steps.preprocess(batch["image"], bf16.resize, jax.numpy.bfloat16)
    logits, intermediates = model.apply({"params": state.params}, images, mutable=["intermediates"])
    assert logits.dtype == np.float32
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(intermediates)} == {jax.numpy.dtype("bfloat16")}

    results = []
    for config in (CONFIG, bf16):
        strategy = make_strategy("jit", config)
        new_state, metrics = one_train_step(strategy, strategy.put_state(steps.create_train_state(config)), batch)
        results.append((strategy.get_state(new_state), jax.device_get(metrics)))
    (fp32_state, fp32_metrics), (bf16_state, bf16_metrics) = results
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves((bf16_state.params, bf16_state.opt_state))} <= {
        np.dtype("float32"), np.dtype("int32")}
    assert bf16_metrics["loss_sum"].dtype == np.float32
    np.testing.assert_allclose(bf16_metrics["loss_sum"], fp32_metrics["loss_sum"], rtol=2e-2)
    updates = [(b - s, f - s) for b, f, s in zip(*(jax.tree_util.tree_leaves(p) for p in (
        bf16_state.params, fp32_state.params, steps.create_train_state(CONFIG).params)))]
    for bf16_update, fp32_update in updates:  # the same step, to bf16's ~3 significant digits
        assert np.linalg.norm(bf16_update - fp32_update) <= 0.05 * np.linalg.norm(fp32_update) + 1e-6


@pytest.mark.parametrize("resize, batch_norm", [(224, False), (96, True)])
def test_parameters_initialised_at_the_smallest_size_equal_those_of_the_full_size(resize, batch_norm):
    """create_train_state initialises at MIN_INPUT_SIZE, sparing the compile of the full-size forward
    pass; the variables must be those that `model.init` gives at the run's own size."""
    config = Config(resize=resize, batch_norm=batch_norm, seed=3)
    state = steps.create_train_state(config)
    params_key, _ = jax.random.split(jax.random.key(config.seed))
    full_size = jax.jit(steps.create_model(config).init)(params_key, np.zeros((1, resize, resize, 1), np.float32))
    assert bool(state.batch_stats) == batch_norm
    chex.assert_trees_all_equal({"params": state.params, "batch_stats": state.batch_stats},
                                {"params": full_size["params"], "batch_stats": full_size.get("batch_stats", {})})
