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

from nin_jax import input_pipeline
from nin_jax.config import Config
from nin_jax.models import NiN

Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the key that dropout masks are derived from.

    Each step's dropout key is `fold_in(dropout_key, step)`: a pure function of the state, so a
    resumed run draws exactly the masks an uninterrupted one would.
    """

    dropout_key: jax.Array


def create_model(config: Config) -> NiN:
    return NiN(num_classes=input_pipeline.NUM_CLASSES, dropout_rate=config.dropout_rate, dtype=jnp.dtype(config.dtype),
               weight_init=config.weight_init)


def create_optimizer(config: Config) -> optax.GradientTransformation:
    return optax.sgd(config.learning_rate)


def create_train_state(config: Config, model: Optional[nn.Module] = None) -> TrainState:
    """Initial parameters, optimizer state and dropout key, all drawn from `config.seed`."""
    model = model or create_model(config)
    params_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    images = jnp.zeros((1, config.resize, config.resize, 1), jnp.float32)
    params = jax.jit(model.init)(params_key, images)["params"]
    return TrainState.create(
        apply_fn=model.apply, params=params, tx=create_optimizer(config), dropout_key=jax.random.key_data(dropout_key)
    )


def _summed_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> Metrics:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
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
               axis_name: Optional[str] = None) -> tuple[TrainState, Metrics]:
    """One SGD step on the mean cross-entropy of the batch's real (unmasked) examples."""
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    if axis_name is not None:
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))
    images = input_pipeline.preprocess(batch["image"], resize, dtype)

    def summed_loss(params):
        logits = state.apply_fn({"params": params}, images, train=True, rngs={"dropout": dropout_key})
        metrics = _summed_metrics(logits, batch["label"], batch["mask"])
        return metrics["loss_sum"], metrics

    grads, metrics = jax.grad(summed_loss, has_aux=True)(state.params)
    grads, metrics = _sum_over_devices((grads, metrics), axis_name)
    grads = jax.tree_util.tree_map(lambda g: g / metrics["count"], grads)
    return state.apply_gradients(grads=grads), metrics


def eval_step(state: TrainState, batch: input_pipeline.Batch, *, resize: int, dtype: Any = jnp.float32,
              axis_name: Optional[str] = None) -> Metrics:
    """Summed loss, correct predictions and real-example count of one padded batch."""
    images = input_pipeline.preprocess(batch["image"], resize, dtype)
    logits = state.apply_fn({"params": state.params}, images, train=False)
    return _sum_over_devices(_summed_metrics(logits, batch["label"], batch["mask"]), axis_name)


def step_functions(config: Config, axis_name: Optional[str] = None):
    """`train_step` and `eval_step` bound to the config's resize and dtype."""
    kwargs = dict(resize=config.resize, dtype=jnp.dtype(config.dtype), axis_name=axis_name)
    return functools.partial(train_step, **kwargs), functools.partial(eval_step, **kwargs)
