"""The train state and the two step functions, written once for every parallel strategy.

`train_step` and `eval_step` take an optional `axis_name`. Under `jax.jit` (one device) it is
None; under `jax.pmap(..., axis_name='batch')` the per-device sums are added across devices with
`lax.psum` before dividing by the number of real examples, which averages gradients and metrics
over the device axis exactly, even when a padded last batch leaves devices with unequal counts.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from nin_jax import augment, input_pipeline, optim
from nin_jax.config import Config
from nin_jax.models import NiN

Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the key that dropout masks and augmentations are derived from, the
    batch-norm running statistics (an empty dict for the book's NiN, which has none), and the
    moving average of both variables that evaluation uses with --ema_decay (an empty dict without).

    Each step's random key is `fold_in(dropout_key, step)`: a pure function of the state, so a
    resumed run draws exactly the masks and crops an uninterrupted one would.
    """

    dropout_key: jax.Array
    batch_stats: Any
    ema: Any

    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def eval_variables(self) -> dict[str, Any]:
        """The variables that evaluation and prediction use: the moving average where one is kept."""
        return self.ema or self.variables()


def create_model(config: Config) -> NiN:
    return NiN(num_classes=input_pipeline.NUM_CLASSES, dropout_rate=config.dropout_rate, dtype=jnp.dtype(config.dtype),
               weight_init=config.weight_init, batch_norm=config.batch_norm)


def create_train_state(config: Config, model: Optional[nn.Module] = None,
                       steps_per_epoch: Optional[int] = None) -> TrainState:
    """Initial parameters, optimizer state and random key, all drawn from `config.seed`.
    `steps_per_epoch` sets the length of a learning-rate schedule (default: the published split's)."""
    model = model or create_model(config)
    params_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    images = jnp.zeros((1, config.resize, config.resize, 1), jnp.float32)
    variables = jax.jit(model.init)(params_key, images)
    tx = optim.create_optimizer(config, steps_per_epoch or optim.default_steps_per_epoch(config))
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    ema = jax.tree_util.tree_map(jnp.copy, variables) if config.ema_decay else {}  # the average starts at the start
    return TrainState.create(apply_fn=model.apply, tx=tx, dropout_key=jax.random.key_data(dropout_key), ema=ema,
                             **variables)


def _summed_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array, label_smoothing: float = 0.0) -> Metrics:
    """Sums over the batch's real examples. With label smoothing the loss is against the smoothed
    targets, the loss that training minimises; accuracy is always against the labels."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    return {
        "loss_sum": jnp.sum(losses * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "count": jnp.sum(mask),
    }


def zero_metrics() -> Metrics:
    """Where a running sum of step metrics starts; float32 like the steps' own sums."""
    return {name: np.zeros((), np.float32) for name in ("loss_sum", "correct", "count")}


def _sum_over_devices(tree: Any, axis_name: Optional[str]) -> Any:
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def train_step(state: TrainState, batch: input_pipeline.Batch, *, resize: int, dtype: Any = jnp.float32,
               augment_images: bool = False, random_erasing: float = 0.0, label_smoothing: float = 0.0,
               ema_decay: float = 0.0, axis_name: Optional[str] = None) -> tuple[TrainState, Metrics]:
    """One optimizer step on the mean cross-entropy of the batch's real (unmasked) examples.

    Batch-norm statistics are those of the real examples of the whole batch, summed over the
    devices inside the model, so every replica computes the same running averages.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    if axis_name is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    dropout_key, augment_key = jax.random.split(key)
    images = batch["image"]
    if augment_images:
        images = augment.random_crop_and_flip(augment_key, images)
    if random_erasing:
        images = augment.random_erasing(jax.random.fold_in(augment_key, 1), images, random_erasing)
    images = input_pipeline.preprocess(images, resize, dtype)

    def summed_loss(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                         mask=batch["mask"], axis_name=axis_name, rngs={"dropout": dropout_key},
                                         mutable=["batch_stats"])
        metrics = _summed_metrics(logits, batch["label"], batch["mask"], label_smoothing)
        return metrics["loss_sum"], (metrics, updates.get("batch_stats", state.batch_stats))

    grads, (metrics, batch_stats) = jax.grad(summed_loss, has_aux=True)(state.params)
    grads, metrics = _sum_over_devices((grads, metrics), axis_name)
    grads = jax.tree_util.tree_map(lambda g: g / metrics["count"], grads)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if ema_decay:
        new_state = new_state.replace(ema=optim.update_ema(state.ema, new_state.variables(), state.step, ema_decay))
    return new_state, metrics


def eval_step(state: TrainState, batch: input_pipeline.Batch, *, resize: int, dtype: Any = jnp.float32,
              test_time_flips: bool = False, axis_name: Optional[str] = None) -> Metrics:
    """Summed loss, correct predictions and real-example count of one padded batch; with
    `test_time_flips`, of the mean logits of each image and its left-right mirror image."""
    images = input_pipeline.preprocess(batch["image"], resize, dtype)
    logits = state.apply_fn(state.eval_variables(), images, train=False)
    if test_time_flips:
        logits = (logits + state.apply_fn(state.eval_variables(), images[:, :, ::-1], train=False)) / 2
    return _sum_over_devices(_summed_metrics(logits, batch["label"], batch["mask"]), axis_name)


def step_functions(config: Config, axis_name: Optional[str] = None):
    """`train_step` and `eval_step` bound to the config's resize, dtype and training options."""
    kwargs = dict(resize=config.resize, dtype=jnp.dtype(config.dtype), axis_name=axis_name)
    train_kwargs = dict(augment_images=config.augment, random_erasing=config.random_erasing,
                        label_smoothing=config.label_smoothing, ema_decay=config.ema_decay)
    eval_kwargs = dict(test_time_flips=config.test_time_flips)
    return functools.partial(train_step, **kwargs, **train_kwargs), functools.partial(eval_step, **kwargs, **eval_kwargs)
