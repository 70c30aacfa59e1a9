"""The strong recipe's pieces: augmentation (crops, flips, random erasing), schedules (cosine,
one-cycle), momentum, weight decay, label smoothing, batch norm over the real examples only, the
moving average of the weights, test-time flips, and the --recipe flag. Each is off in the
reference recipe."""

import dataclasses
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nin_jax import augment, batch_norm, input_pipeline, optim, parallel, steps
from nin_jax.config import Config, ConfigError, parse_flags
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


def erased_box(original: np.ndarray, erased: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the smallest rectangle holding every changed pixel."""
    rows, columns = np.nonzero((original != erased).any(-1))
    return rows.min(), columns.min(), rows.max() - rows.min() + 1, columns.max() - columns.min() + 1


def test_random_erasing_replaces_one_rectangle_of_each_image_with_noise():
    images = np.full((256, 28, 28, 1), 7, np.uint8)
    out = np.asarray(jax.jit(augment.random_erasing, static_argnums=2)(jax.random.key(0), images, 1.0))
    chex.assert_shape(out, images.shape)
    chex.assert_type(out, np.uint8)
    boxes = [erased_box(image, erased) for image, erased in zip(images, out)]  # every image has one
    for (top, left, height, width), erased in zip(boxes, out):
        box = erased[top : top + height, left : left + width]
        assert np.mean(box != 7) > 0.9  # noise fills the rectangle (1 in 256 of its pixels stay 7)
        area = height * width / 28**2
        assert augment.ERASED_AREA[0] / 2 <= area <= augment.ERASED_AREA[1] * 1.2, (height, width)
        assert 0.2 <= height / width <= 5, (height, width)  # ERASED_ASPECT, with rounding and clipping
    assert len({box[:2] for box in boxes}) > 100  # the rectangles are all over the image
    assert len({box[2:] for box in boxes}) > 50


def test_random_erasing_erases_with_its_probability_and_depends_on_the_key():
    images = np.random.default_rng(0).integers(0, 256, (256, 28, 28, 1), dtype=np.uint8)
    out = np.asarray(augment.random_erasing(jax.random.key(0), images, 0.5))
    erased = (out != images).any(axis=(1, 2, 3))
    assert 0.4 < erased.mean() < 0.6
    np.testing.assert_array_equal(out[~erased], images[~erased])  # image i stays in place i
    np.testing.assert_array_equal(out, augment.random_erasing(jax.random.key(0), images, 0.5))
    assert not np.array_equal(out, augment.random_erasing(jax.random.key(1), images, 0.5))
    np.testing.assert_array_equal(augment.random_erasing(jax.random.key(0), images, 0.0), images)


def strong(**changes) -> Config:
    return Config.from_recipe("strong", resize=67, batch_size=16, **changes)


def test_cosine_schedule_warms_up_to_the_peak_and_decays_to_zero():
    config = strong(num_epochs=4, warmup_epochs=1.0, learning_rate=0.02, lr_schedule="cosine")
    schedule = optim.learning_rate_schedule(config, STEPS_PER_EPOCH)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(schedule(5), 0.01, rtol=1e-6)  # halfway through the warm-up
    np.testing.assert_allclose(schedule(STEPS_PER_EPOCH), 0.02, rtol=1e-6)  # the peak, at the warm-up's end
    np.testing.assert_allclose(schedule(25), 0.01, rtol=1e-6)  # cosine: half the peak halfway through the decay
    assert float(schedule(4 * STEPS_PER_EPOCH)) == 0.0
    values = [float(schedule(t)) for t in range(STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_onecycle_schedule_rises_over_the_warm_up_then_decays_to_almost_zero():
    config = strong(num_epochs=4, warmup_epochs=1.0, learning_rate=0.2, lr_schedule="onecycle")
    schedule = optim.learning_rate_schedule(config, STEPS_PER_EPOCH)
    np.testing.assert_allclose(schedule(0), 0.2 / 25, rtol=1e-6)
    np.testing.assert_allclose(schedule(STEPS_PER_EPOCH), 0.2, rtol=1e-6)  # the peak, at the warm-up's end
    np.testing.assert_allclose(schedule(4 * STEPS_PER_EPOCH), 0.2 / 25 / 1e4, rtol=1e-5)
    values = [float(schedule(t)) for t in range(4 * STEPS_PER_EPOCH + 1)]
    assert all(a < b for a, b in zip(values[:STEPS_PER_EPOCH], values[1 : STEPS_PER_EPOCH + 1]))
    assert all(a > b for a, b in zip(values[STEPS_PER_EPOCH:], values[STEPS_PER_EPOCH + 1 :]))


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


def test_the_reference_model_has_no_batch_statistics_and_no_moving_average():
    state = steps.create_train_state(Config(resize=67))
    assert state.batch_stats == {} and state.ema == {}
    assert state.eval_variables() == {"params": state.params, "batch_stats": {}}
    assert (Config().random_erasing, Config().ema_decay, Config().test_time_flips) == (0.0, 0.0, False)


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


@pytest.mark.parametrize("strategy_class", [parallel.JitStrategy, parallel.PmapStrategy, parallel.ShardingStrategy])
def test_a_batch_norm_step_on_a_padded_batch_is_the_step_on_its_real_examples(strategy_class):
    """3 real examples of 16: under pmap and sharding, 3 of the 4 devices hold padding only."""
    config = Config(resize=67, batch_size=16, batch_norm=True, dropout_rate=0.0)
    batch = padded_batch(3)
    unpadded = dataclasses.replace(config, batch_size=3)
    expected, expected_metrics = parallel.JitStrategy(unpadded).train_step(
        steps.create_train_state(unpadded), {name: values[:3] for name, values in batch.items()})
    strategy = strategy_class(config)
    state, metrics = strategy.train_step(strategy.put_state(steps.create_train_state(config)), batch)
    state = strategy.get_state(state)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4)  # noqa: E731
    jax.tree_util.tree_map(close, state.batch_stats, expected.batch_stats)
    jax.tree_util.tree_map(close, state.params, expected.params)
    assert metrics["count"] == 3
    np.testing.assert_allclose(metrics["loss_sum"], expected_metrics["loss_sum"], rtol=1e-5)


def test_the_compiled_batch_norm_gradient_is_the_op_by_op_gradient():
    """XLA fuses batch norm and ReLU into what reads them, max-pooling included: the fused
    program's gradient must still be the model's."""
    config = Config(resize=67, batch_norm=True, dropout_rate=0.0)
    state = steps.create_train_state(config)
    images = steps.preprocess(random_batch(16, 16)["image"], config.resize)

    def loss(params):
        logits, _ = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                   mutable=["batch_stats"])
        return jnp.sum(jnp.square(logits))

    with jax.disable_jit():
        expected = jax.grad(loss)(state.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max()),
                           jax.jit(jax.grad(loss))(state.params), expected)


def test_the_moving_average_follows_the_weights_and_is_what_evaluation_uses():
    decay = 0.9
    config = strong(ema_decay=decay, batch_norm=True, dropout_rate=0.0)
    state = steps.create_train_state(config, steps_per_epoch=STEPS_PER_EPOCH)
    expected = jax.device_get(state.variables())  # a copy: the train step donates the state's arrays
    chex.assert_trees_all_equal(state.ema, expected)  # the average starts at the initial weights
    strategy = parallel.JitStrategy(config)
    state = strategy.put_state(state)
    for step in range(3):
        state, _ = strategy.train_step(state, random_batch(config.batch_size, 16, seed=step))
        rate = 1 - min(decay, (1 + step) / (10 + step))
        expected = jax.tree_util.tree_map(lambda e, v: (1 - rate) * e + rate * v, expected, state.variables())
    chex.assert_trees_all_close(state.ema, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(state.ema["params"]["block1"]["conv"]["kernel"], state.params["block1"]["conv"]["kernel"])

    batch = random_batch(config.batch_size, 11)
    averaged = state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"], ema={})
    chex.assert_trees_all_close(strategy.eval_step(state, batch), strategy.eval_step(averaged, batch), rtol=1e-6)
    trained = state.replace(ema={})
    assert strategy.eval_step(state, batch)["loss_sum"] != strategy.eval_step(trained, batch)["loss_sum"]


def test_test_time_flips_average_the_logits_of_each_image_and_its_mirror_image():
    config = Config(resize=67, batch_size=16, test_time_flips=True, weight_init="xavier")  # kaiming starts input-blind
    state = steps.create_train_state(config)
    batch = random_batch(config.batch_size, 11)
    images = steps.preprocess(batch["image"], config.resize)
    logits = (state.apply_fn(state.variables(), images) + state.apply_fn(state.variables(), images[:, :, ::-1])) / 2
    expected = steps._summed_metrics(logits, batch["label"], batch["mask"])
    flipped = parallel.JitStrategy(config).eval_step(state, batch)
    chex.assert_trees_all_close(flipped, expected, rtol=1e-5)
    plain = parallel.JitStrategy(dataclasses.replace(config, test_time_flips=False)).eval_step(state, batch)
    assert plain["loss_sum"] != flipped["loss_sum"]


def test_random_erasing_changes_the_training_step_only_when_asked():
    config = strong(dropout_rate=0.0, augment=False, weight_init="xavier")  # kaiming's first logits ignore the input
    batch = random_batch(config.batch_size, 16)
    losses = {}
    for probability in (0.0, 1.0):
        erasing = dataclasses.replace(config, random_erasing=probability)
        state = steps.create_train_state(erasing, steps_per_epoch=STEPS_PER_EPOCH)
        losses[probability] = float(parallel.JitStrategy(erasing).train_step(state, batch)[1]["loss_sum"])
    plain_state = steps.create_train_state(config, steps_per_epoch=STEPS_PER_EPOCH)
    assert losses[0.0] == float(parallel.JitStrategy(config).train_step(plain_state, batch)[1]["loss_sum"])
    assert losses[1.0] != losses[0.0]


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
    (dict(random_erasing=1.5), "--random_erasing must be in [0, 1]"),
    (dict(ema_decay=1.0), "--ema_decay must be in [0, 1)"),
    (dict(lr_schedule="linear"), "--lr_schedule must be one of constant, cosine, onecycle"),
])
def test_impossible_recipe_values_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(Config(), **changes).validate()
