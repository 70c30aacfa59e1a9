"""The strong recipe's pieces: augmentation, schedule, momentum, weight decay, label smoothing,
batch norm, and the --recipe flag. Each is off in the reference recipe."""

import dataclasses
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nin_jax import augment, optim, parallel, steps
from nin_jax.config import Config, ConfigError
from nin_jax.recipes import RECIPES

import train

from test_steps import random_batch

STEPS_PER_EPOCH = 10


def crops_and_flips(image: np.ndarray, padding: int) -> list[np.ndarray]:
    """Every output `random_crop_and_flip` may make of `image`."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    crops = [padded[i : i + height, j : j + width] for i, j in itertools.product(range(2 * padding + 1), repeat=2)]
    return crops + [crop[:, ::-1] for crop in crops]


def test_augmentation_keeps_shape_dtype_and_each_image_in_its_place():
    images = np.random.default_rng(0).integers(1, 256, (32, 28, 28, 1), dtype=np.uint8)
    out = np.asarray(jax.jit(augment.random_crop_and_flip)(jax.random.key(0), images))
    chex.assert_shape(out, images.shape)
    chex.assert_type(out, np.uint8)
    for i in range(len(images)):  # image i comes from image i (so labels stay aligned), and from no other
        assert any(np.array_equal(out[i], c) for c in crops_and_flips(images[i], augment.PADDING)), i
        assert not any(np.array_equal(out[i], c) for c in crops_and_flips(images[(i + 1) % 32], augment.PADDING))


def test_augmentation_draws_every_shift_and_flip_and_depends_on_the_key():
    images = np.random.default_rng(0).integers(1, 256, (256, 28, 28, 1), dtype=np.uint8)
    out = np.asarray(augment.random_crop_and_flip(jax.random.key(0), images))
    drawn = [[np.array_equal(o, c) for c in crops_and_flips(i, augment.PADDING)].index(True) for o, i in zip(out, images)]
    assert len(set(drawn)) >= 45  # of the 25 shifts x 2 flips (256 uniform draws miss 0.3 of them on average)
    assert 0.4 < np.mean(np.array(drawn) >= 25) < 0.6  # about half are flipped
    np.testing.assert_array_equal(out, augment.random_crop_and_flip(jax.random.key(0), images))
    assert not np.array_equal(out, augment.random_crop_and_flip(jax.random.key(1), images))


def strong(**changes) -> Config:
    return Config.from_recipe("strong", resize=67, batch_size=16, **changes)


def test_cosine_schedule_warms_up_to_the_peak_and_decays_to_zero():
    config = strong(num_epochs=4, warmup_epochs=1.0, learning_rate=0.02)
    schedule = optim.learning_rate_schedule(config, STEPS_PER_EPOCH)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(schedule(5), 0.01, rtol=1e-6)  # halfway through the warm-up
    np.testing.assert_allclose(schedule(STEPS_PER_EPOCH), 0.02, rtol=1e-6)  # the peak, at the warm-up's end
    np.testing.assert_allclose(schedule(25), 0.01, rtol=1e-6)  # cosine: half the peak halfway through the decay
    assert float(schedule(4 * STEPS_PER_EPOCH)) == 0.0
    values = [float(schedule(t)) for t in range(STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_reference_optimizer_is_the_books_plain_sgd():
    params = {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}
    grads = jax.tree_util.tree_map(lambda p: p * 0.5, params)
    tx = optim.create_optimizer(Config(), STEPS_PER_EPOCH)
    expected = optax.sgd(0.1)
    chex.assert_trees_all_equal_structs(tx.init(params), expected.init(params))
    chex.assert_trees_all_close(tx.update(grads, tx.init(params))[0], expected.update(grads, expected.init(params))[0])


def test_weight_decay_reaches_the_update_of_kernels_only():
    params = {"conv": {"kernel": jnp.full((3, 3), 2.0), "bias": jnp.full(3, 2.0)}}
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    tx = optim.create_optimizer(Config(learning_rate=0.1, weight_decay=0.01), STEPS_PER_EPOCH)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.01 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["conv"]["bias"], 0.0)


def test_nesterov_momentum_builds_up_over_steps():
    params = {"kernel": jnp.zeros(2)}
    grads = {"kernel": jnp.ones(2)}
    tx = optim.create_optimizer(Config(learning_rate=0.1, momentum=0.9, nesterov=True), STEPS_PER_EPOCH)
    state = tx.init(params)
    first, state = tx.update(grads, state, params)
    second, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(first["kernel"], -0.1 * (1 + 0.9), rtol=1e-6)  # g + m * (g)
    np.testing.assert_allclose(second["kernel"], -0.1 * (1 + 0.9 * 1.9), rtol=1e-6)  # g + m * (g + m * g)


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
    logits = jax.random.normal(jax.random.key(0), (4, 10))
    labels = jnp.array([0, 3, 9, 3])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])
    plain = steps._summed_metrics(logits, labels, mask)
    np.testing.assert_allclose(
        plain["loss_sum"], optax.softmax_cross_entropy_with_integer_labels(logits[:3], labels[:3]).sum(), rtol=1e-6
    )
    smoothed = steps._summed_metrics(logits, labels, mask, label_smoothing=0.1)
    targets = 0.9 * jax.nn.one_hot(labels, 10) + 0.01
    expected = -(targets * jax.nn.log_softmax(logits)).sum(-1)[:3].sum()
    np.testing.assert_allclose(smoothed["loss_sum"], expected, rtol=1e-6)
    assert smoothed["correct"] == plain["correct"]


def test_the_strong_recipe_step_learns_on_one_batch_under_jit_and_pmap():
    """Momentum, schedule, decay, smoothing and augmentation together lower the loss of a batch."""
    config = strong(num_epochs=1, warmup_epochs=0.1, dropout_rate=0.0)
    batch = random_batch(config.batch_size, 16)
    for strategy in (parallel.JitStrategy(config), parallel.PmapStrategy(config)):
        state = strategy.put_state(steps.create_train_state(config, steps_per_epoch=STEPS_PER_EPOCH))
        losses = []
        for _ in range(6):
            state, metrics = strategy.train_step(state, batch)
            losses.append(float(metrics["loss_sum"] / metrics["count"]))
        assert losses[-1] < losses[0], (strategy.name, losses)


def test_batch_norm_variant_updates_running_statistics_the_same_on_every_device():
    config = Config(resize=67, batch_size=16, batch_norm=True)
    batch = random_batch(config.batch_size, 16)
    initial = steps.create_train_state(config)
    assert jax.tree_util.tree_leaves(initial.batch_stats)
    strategy = parallel.PmapStrategy(config)
    state, metrics = strategy.train_step(strategy.put_state(initial), batch)
    for leaf in jax.tree_util.tree_leaves(state.batch_stats):  # replicas agree after the pmean
        np.testing.assert_allclose(leaf, np.broadcast_to(leaf[0], leaf.shape), rtol=1e-6)
    moved = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), strategy.get_state(state).batch_stats,
                                   initial.batch_stats)
    assert all(jax.tree_util.tree_leaves(moved))
    eval_metrics = strategy.eval_step(state, batch)
    assert eval_metrics["count"] == 16 and np.isfinite(eval_metrics["loss_sum"])


def test_the_reference_model_has_no_batch_statistics():
    assert steps.create_train_state(Config(resize=67)).batch_stats == {}


def test_recipe_flag_sets_defaults_that_explicit_flags_override():
    config, _ = train.parse_config(train.build_parser(), ["--recipe", "strong", "--learning_rate", "0.01"])
    assert config == Config.from_recipe("strong", learning_rate=0.01)
    assert (config.momentum, config.nesterov, config.augment) == (0.9, True, True)
    assert train.parse_config(train.build_parser(), [])[0] == Config()


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
])
def test_impossible_recipe_values_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(Config(), **changes).validate()
