"""The strong recipe's pieces: schedules (cosine, one-cycle), momentum, weight decay, label
smoothing, batch norm over the real examples only, and the --recipe flag. Each is off in the
reference recipe."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nin_jax import input_pipeline, models, steps
from nin_jax.ops import batch_norm
from nin_jax.runtime import parallel
from nin_jax.config import Config, ConfigError, parse_flags
from nin_jax.config import RECIPES

import train

from conftest import float64, one_eval_step, one_train_step, make_strategy
from test_steps import random_batch

STEPS_PER_EPOCH = 10


def strong(**changes) -> Config:
    return Config.from_recipe("strong", resize=67, batch_size=16, **changes)


def test_cosine_schedule_warms_up_to_the_peak_and_decays_to_zero():
    config = strong(num_epochs=4, warmup_epochs=1.0, learning_rate=0.02, lr_schedule="cosine")
    schedule = steps.learning_rate_schedule(config, STEPS_PER_EPOCH)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(schedule(5), 0.01, rtol=1e-6)  # halfway through the warm-up
    np.testing.assert_allclose(schedule(STEPS_PER_EPOCH), 0.02, rtol=1e-6)  # the peak, at the warm-up's end
    np.testing.assert_allclose(schedule(25), 0.01, rtol=1e-6)  # cosine: half the peak halfway through the decay
    assert float(schedule(4 * STEPS_PER_EPOCH)) == 0.0
    values = [float(schedule(t)) for t in range(STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_onecycle_schedule_rises_over_the_warm_up_then_decays_to_almost_zero():
    config = strong(num_epochs=4, warmup_epochs=1.0, learning_rate=0.2, lr_schedule="onecycle")
    schedule = steps.learning_rate_schedule(config, STEPS_PER_EPOCH)
    np.testing.assert_allclose(schedule(0), 0.2 / 25, rtol=1e-6)
    np.testing.assert_allclose(schedule(STEPS_PER_EPOCH), 0.2, rtol=1e-6)  # the peak, at the warm-up's end
    np.testing.assert_allclose(schedule(4 * STEPS_PER_EPOCH), 0.2 / 25 / 1e4, rtol=1e-5)
    values = [float(schedule(t)) for t in range(4 * STEPS_PER_EPOCH + 1)]
    assert all(a < b for a, b in zip(values[:STEPS_PER_EPOCH], values[1 : STEPS_PER_EPOCH + 1]))
    assert all(a > b for a, b in zip(values[STEPS_PER_EPOCH:], values[STEPS_PER_EPOCH + 1 :]))


def test_reference_optimizer_is_the_books_plain_sgd():
    params = {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}
    grads = jax.tree_util.tree_map(lambda p: p * 0.5, params)
    tx = steps.create_optimizer(Config(), STEPS_PER_EPOCH)
    expected = optax.sgd(0.1)
    chex.assert_trees_all_equal_structs(tx.init(params), expected.init(params))
    chex.assert_trees_all_close(tx.update(grads, tx.init(params))[0], expected.update(grads, expected.init(params))[0])


def test_weight_decay_reaches_the_update_of_kernels_only():
    params = {"conv": {"kernel": jnp.full((3, 3), 2.0), "bias": jnp.full(3, 2.0)}}
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    tx = steps.create_optimizer(Config(learning_rate=0.1, weight_decay=0.01), STEPS_PER_EPOCH)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.01 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["conv"]["bias"], 0.0)


def test_nesterov_momentum_builds_up_over_steps():
    params = {"kernel": jnp.zeros(2)}
    grads = {"kernel": jnp.ones(2)}
    tx = steps.create_optimizer(Config(learning_rate=0.1, momentum=0.9, nesterov=True), STEPS_PER_EPOCH)
    state = tx.init(params)
    first, state = tx.update(grads, state, params)
    second, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(first["kernel"], -0.1 * (1 + 0.9), rtol=1e-6)  # g + m * (g)
    np.testing.assert_allclose(second["kernel"], -0.1 * (1 + 0.9 * 1.9), rtol=1e-6)  # g + m * (g + m * g)


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
    logits = jax.random.normal(jax.random.key(0), (4, 10))
    labels = jnp.array([0, 3, 9, 3])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])
    plain = steps.summed_metrics(logits, labels, mask)
    np.testing.assert_allclose(
        plain["loss_sum"], optax.softmax_cross_entropy_with_integer_labels(logits[:3], labels[:3]).sum(), rtol=1e-6
    )
    smoothed = steps.summed_metrics(logits, labels, mask, label_smoothing=0.1)
    targets = 0.9 * jax.nn.one_hot(labels, 10) + 0.01
    expected = -(targets * jax.nn.log_softmax(logits)).sum(-1)[:3].sum()
    np.testing.assert_allclose(smoothed["loss_sum"], expected, rtol=1e-6)
    assert smoothed["correct"] == plain["correct"]


def test_the_strong_recipe_step_learns_on_one_batch_under_jit_and_pmap():
    """Momentum, schedule, decay and smoothing together lower the loss of a batch."""
    config = strong(num_epochs=1, warmup_epochs=0.1, dropout_rate=0.0)
    batch = random_batch(config.batch_size, 16)
    for strategy in (make_strategy("jit", config), make_strategy("pmap", config)):
        state = strategy.put_state(steps.create_train_state(config, steps_per_epoch=STEPS_PER_EPOCH))
        losses = []
        for _ in range(6):
            state, metrics = one_train_step(strategy, state, batch)
            losses.append(float(metrics["loss_sum"] / metrics["count"]))
        assert losses[-1] < losses[0], (strategy.name, losses)


def test_batch_norm_variant_updates_running_statistics_the_same_on_every_device():
    config = Config(resize=67, batch_size=16, batch_norm=True)
    batch = random_batch(config.batch_size, 16)
    initial = steps.create_train_state(config)
    assert jax.tree_util.tree_leaves(initial.batch_stats)
    strategy = make_strategy("pmap", config)
    state, metrics = one_train_step(strategy, strategy.put_state(initial), batch)
    for leaf in jax.tree_util.tree_leaves(state.batch_stats):  # replicas agree after the pmean
        np.testing.assert_allclose(leaf, np.broadcast_to(leaf[0], leaf.shape), rtol=1e-6)
    moved = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), strategy.get_state(state).batch_stats,
                                   initial.batch_stats)
    assert all(jax.tree_util.tree_leaves(moved))
    eval_metrics = one_eval_step(strategy, state, batch)
    assert eval_metrics["count"] == 16 and np.isfinite(eval_metrics["loss_sum"])


def test_the_reference_model_has_no_batch_statistics():
    state = steps.create_train_state(Config(resize=67))
    assert state.batch_stats == {}
    assert state.variables() == {"params": state.params, "batch_stats": {}}


def padded_batch(num_real: int, batch_size: int = 16) -> input_pipeline.Batch:
    """A batch with `num_real` real examples, and padding that is noise, not zeros: whatever it
    holds must not count."""
    batch = random_batch(batch_size, num_real)
    batch["image"][num_real:] = np.random.default_rng(1).integers(0, 256, batch["image"][num_real:].shape)
    return batch


def test_batch_statistics_are_those_of_the_real_examples_on_one_device_and_across_devices():
    x = np.random.default_rng(0).normal(3.0, 2.0, (16, 5, 5, 8)).astype(np.float32)
    mask = (np.arange(16) < 3).astype(np.float32)  # 3 real examples: shards 2 to 4 are all padding
    expected = x[:3].mean((0, 1, 2)), x[:3].var((0, 1, 2))
    np.testing.assert_allclose(jax.jit(batch_norm.batch_statistics)(x, mask), expected, rtol=1e-5, atol=1e-5)
    shard = lambda a: a.reshape((4, -1) + a.shape[1:])  # noqa: E731
    per_device = jax.pmap(lambda x, m: batch_norm.batch_statistics(x, m, "batch"), axis_name="batch")(shard(x), shard(mask))
    for device in range(4):  # every device holds the statistics of the 3 real examples
        np.testing.assert_allclose([per_device[0][device], per_device[1][device]], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["jit", "pmap", "sharding"])
def test_a_batch_norm_step_on_a_padded_batch_is_the_step_on_its_real_examples(kind):
    """3 real examples of 16: under pmap and sharding, 3 of the 4 devices hold padding only."""
    config = Config(resize=67, batch_size=16, batch_norm=True, dropout_rate=0.0)
    batch = padded_batch(3)
    unpadded = dataclasses.replace(config, batch_size=3)
    expected, expected_metrics = one_train_step(
        make_strategy("jit", unpadded), steps.create_train_state(unpadded), {name: values[:3] for name, values in batch.items()})
    strategy = make_strategy(kind, config)
    state, metrics = one_train_step(strategy, strategy.put_state(steps.create_train_state(config)), batch)
    state = strategy.get_state(state)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4)  # noqa: E731
    jax.tree_util.tree_map(close, state.batch_stats, expected.batch_stats)
    jax.tree_util.tree_map(close, state.params, expected.params)
    assert metrics["count"] == 3
    np.testing.assert_allclose(metrics["loss_sum"], expected_metrics["loss_sum"], rtol=1e-5)


def test_the_compiled_batch_norm_gradient_is_the_op_by_op_gradient():
    """XLA fuses batch norm and ReLU into what reads them, max-pooling included: the fused
    program's gradient must still be the model's. The model in float64 (its batch statistics stay
    float32), where a gradient routed to the wrong element stands out from rounding: all in float32,
    batch norm over 16 examples magnified the two programs' rounding past this tolerance on jax
    0.12's CPU choices."""
    config = Config(resize=67, batch_norm=True, dropout_rate=0.0)
    with float64():
        model = dataclasses.replace(steps.create_model(config), dtype=jnp.float64)
        state = steps.create_train_state(config, model)
        params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), state.params)
        images = steps.preprocess(random_batch(8, 8)["image"], config.resize, jnp.float64)

        def loss(params):
            logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                    mutable=["batch_stats"])
            return jnp.sum(jnp.square(logits.astype(jnp.float64)))

        with jax.disable_jit():
            expected = jax.grad(loss)(params)
        compiled = jax.jit(jax.grad(loss))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max()),
                           compiled, expected)


def test_recipe_flag_sets_defaults_that_explicit_flags_override():
    config, _ = parse_flags(train.build_parser(), ["--recipe", "strong", "--learning_rate", "0.01"])
    assert config == Config.from_recipe("strong", learning_rate=0.01)
    assert (config.momentum, config.nesterov, config.batch_norm, config.learning_rate) == (0.9, True, True, 0.01)
    assert parse_flags(train.build_parser(), [])[0] == Config()


def test_every_recipe_is_a_valid_config_and_the_reference_changes_nothing():
    assert RECIPES["reference"] == {}
    for name in RECIPES:
        Config.from_recipe(name).validate()
    with pytest.raises(ConfigError, match="--recipe must be one of reference, strong"):
        Config.from_recipe("fast")


@pytest.mark.parametrize("changes, message", [
    (dict(momentum=1.0), "--momentum must be in [0, 1)"),
    (dict(nesterov=True), "--nesterov needs a --momentum above 0"),
    (dict(warmup_epochs=11.0), "--warmup_epochs must be in [0, --num_epochs=10]"),
    (dict(weight_decay=-1.0), "--weight_decay must be 0 (off) or positive"),
    (dict(label_smoothing=1.0), "--label_smoothing must be in [0, 1)"),
    (dict(lr_schedule="linear"), "--lr_schedule must be one of constant, cosine, onecycle"),
])
def test_impossible_recipe_values_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(Config(), **changes).validate()
