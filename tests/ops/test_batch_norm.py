"""Batch norm over the real examples only (nin_jax/ops/batch_norm.py), on one device and across
devices, and its compiled gradient."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nin_jax import input_pipeline, steps
from nin_jax.config import Config
from nin_jax.ops import batch_norm

from conftest import float64, make_strategy, one_eval_step, one_train_step, random_batch


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


@pytest.mark.parametrize("train", [True, False])
def test_without_padding_it_is_flax_batch_norm_in_value_gradient_and_running_statistics(train):
    """The same function as `nn.BatchNorm` (same variables), whatever the order of its arithmetic:
    outputs, gradients and the updated running statistics, in float64."""
    import flax.linen as nn

    with float64():
        x = jax.random.normal(jax.random.key(0), (6, 5, 5, 8), jnp.float64) * 2.0 + 3.0
        ours = batch_norm.MaskedBatchNorm(dtype=jnp.float64)
        flax = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float64)
        variables = ours.init(jax.random.key(1), x)
        keys = iter(jax.random.split(jax.random.key(2), 4))
        variables = jax.tree_util.tree_map(lambda v: v + 0.3 * jax.random.normal(next(keys), v.shape, jnp.float64),
                                           variables)  # a scale, bias and running statistics of their own
        variables["batch_stats"]["var"] = jnp.abs(variables["batch_stats"]["var"])

        def apply(module, params, call):
            return call(module, {**variables, "params": params}, x)

        ours_call = lambda m, v, x: m.apply(v, x, train=train, mutable=["batch_stats"])  # noqa: E731
        flax_call = lambda m, v, x: m.apply(v, x, mutable=["batch_stats"])  # noqa: E731
        (y, stats), (expected, expected_stats) = (apply(ours, variables["params"], ours_call),
                                                  apply(flax, variables["params"], flax_call))
        cotangent = jax.random.normal(jax.random.key(3), x.shape, jnp.float64)
        grads, expected_grads = (jax.grad(lambda p, m=m, c=c: jnp.sum(apply(m, p, c)[0] * cotangent))(variables["params"])
                                 for m, c in ((ours, ours_call), (flax, flax_call)))
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12), stats, expected_stats)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10), grads, expected_grads)
