"""The train state, the optimizer and its schedules, preprocessing, and the train and eval steps
(nin_jax/steps.py), as the loop runs them under jit."""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nin_jax import steps
from nin_jax.config import Config

from conftest import STEP_CONFIG, make_strategy, one_eval_step, one_train_step, random_batch


def test_train_step_is_sgd_on_the_mean_loss_of_real_examples():
    batch = random_batch(STEP_CONFIG.batch_size, num_real=11)
    state = steps.create_train_state(STEP_CONFIG)
    images = steps.preprocess(batch["image"][:11], STEP_CONFIG.resize)

    def mean_loss(params):
        logits = state.apply_fn({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"][:11]).mean()

    expected_loss, grads = jax.jit(jax.value_and_grad(mean_loss))(state.params)
    expected = jax.tree_util.tree_map(lambda p, g: p - STEP_CONFIG.learning_rate * g, state.params, grads)
    new_state, metrics = one_train_step(make_strategy("jit", STEP_CONFIG), state, batch)  # donates `state`
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new_state.params, expected)
    np.testing.assert_allclose(metrics["loss_sum"] / metrics["count"], expected_loss, rtol=1e-5)


def test_dropout_masks_follow_the_step():
    """Dropout keys come from (seed, step), not from hidden state: two runs of the same step agree."""
    config = dataclasses.replace(STEP_CONFIG, dropout_rate=0.5)
    batch = random_batch(config.batch_size, 16)
    strategy = make_strategy("jit", config)
    first = one_train_step(strategy, steps.create_train_state(config), batch)[0]
    again = one_train_step(strategy, steps.create_train_state(config), batch)[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, first.params, again.params)


def test_eval_step_counts_only_real_examples():
    batch = random_batch(STEP_CONFIG.batch_size, num_real=5)
    metrics = one_eval_step(make_strategy("jit", STEP_CONFIG), steps.create_train_state(STEP_CONFIG), batch)
    assert metrics["count"] == 5
    assert 0 <= metrics["correct"] <= 5


def test_bfloat16_step_computes_in_bf16_and_keeps_parameters_optimizer_and_loss_in_float32():
    """Mixed precision: bf16 activations, float32 parameters, updates and loss, close to the fp32 step."""
    batch = random_batch(STEP_CONFIG.batch_size, STEP_CONFIG.batch_size)
    bf16 = dataclasses.replace(STEP_CONFIG, dtype="bfloat16")
    model = steps.create_model(bf16)
    state = steps.create_train_state(bf16)
    images = steps.preprocess(batch["image"], bf16.resize, jax.numpy.bfloat16)
    logits, intermediates = model.apply({"params": state.params}, images, mutable=["intermediates"])
    assert logits.dtype == np.float32
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(intermediates)} == {jax.numpy.dtype("bfloat16")}

    results = []
    for config in (STEP_CONFIG, bf16):
        strategy = make_strategy("jit", config)
        new_state, metrics = one_train_step(strategy, strategy.put_state(steps.create_train_state(config)), batch)
        results.append((strategy.get_state(new_state), jax.device_get(metrics)))
    (fp32_state, fp32_metrics), (bf16_state, bf16_metrics) = results
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves((bf16_state.params, bf16_state.opt_state))} <= {
        np.dtype("float32"), np.dtype("int32")}
    assert bf16_metrics["loss_sum"].dtype == np.float32
    np.testing.assert_allclose(bf16_metrics["loss_sum"], fp32_metrics["loss_sum"], rtol=2e-2)
    updates = [(b - s, f - s) for b, f, s in zip(*(jax.tree_util.tree_leaves(p) for p in (
        bf16_state.params, fp32_state.params, steps.create_train_state(STEP_CONFIG).params)))]
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


def test_preprocess_scales_to_unit_range_and_resizes_bilinearly():
    images = np.zeros((2, 28, 28, 1), np.uint8)
    images[0] = 255
    images[1, :, 14:] = 255
    out = steps.preprocess(images, 96)
    chex.assert_shape(out, (2, 96, 96, 1))
    np.testing.assert_allclose(out[0], 1.0)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    edge = np.asarray(out[1, 0, 45:51, 0])
    assert np.all(np.diff(edge) >= 0) and 0 < edge[2] < 1  # a bilinear ramp, not a hard nearest-neighbour edge


def test_preprocess_in_bfloat16_resizes_in_bfloat16_to_within_its_rounding_of_float32():
    """bf16 images are resized in bf16 (the GPU's bf16 units, not float32 dots at the highest
    precision): within bf16's rounding of the float32 resize, whose every value is as before. The
    images, the first product and the second are each rounded to bf16, and jax 0.12 on a CPU adds
    up bf16 products in bf16: within 3 bf16 steps at 1 (2^-8 each)."""
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    fp32 = np.asarray(steps.preprocess(images, 96))
    before = jax.image.resize(images.astype(np.float32) / 255.0, (4, 96, 96, 1), "bilinear")
    np.testing.assert_array_equal(fp32, before)
    bf16 = steps.preprocess(images, 96, jax.numpy.bfloat16)
    assert bf16.dtype == jax.numpy.bfloat16
    lowered = jax.jit(steps.preprocess, static_argnums=(1, 2)).lower(images, 96, jax.numpy.bfloat16).as_text()
    assert "dot_general" in lowered and not re.search(r"dot_general[^\n]*-> tensor<[^\n]*f32>", lowered)
    np.testing.assert_allclose(np.asarray(bf16, np.float32), fp32, atol=3 * 2**-8)


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
