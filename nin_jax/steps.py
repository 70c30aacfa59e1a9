"""The train state, the optimizer and the two steps: `train_step` and `eval_step`, pure functions
that `jax.jit` compiles for one device or a device mesh, and `jax.pmap` for each device.

Every step sums its metrics over the batch's real (unmasked) examples; under `jax.pmap(...,
axis_name='batch')` those sums and the gradients are added across the devices with `lax.psum`
before the division by the number of real examples, so a padded last batch that leaves devices
with unequal counts is still averaged exactly. Under `jax.jit` (one device or a mesh) `axis_name` is
None and the batch is one array whose sums are already global.
"""

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from nin_jax import input_pipeline
from nin_jax.config import Config
from nin_jax.models import MIN_INPUT_SIZE, NiN

Metrics = dict[str, jax.Array]
METRIC_NAMES = ("loss_sum", "correct", "count")


def create_model(config: Config) -> NiN:
    return NiN(num_classes=input_pipeline.NUM_CLASSES, dropout_rate=config.dropout_rate, weight_init=config.weight_init,
               batch_norm=config.batch_norm, dtype=jnp.dtype(config.dtype), kernels=config.kernels,
               variant=config.variant)


# The optimizer: the book's plain SGD, or SGD with the parts of a stronger recipe switched on. Every
# part is off in the reference recipe (`Config()`), which leaves `optax.sgd(0.1)`:
#   * momentum, optionally Nesterov's;
#   * a learning-rate schedule: linear warm-up from 0, then cosine decay to 0 at the last step; or
#     optax's one-cycle, which rises over the warm-up from a 25th of the peak, then decays;
#   * L2 weight decay on the convolution kernels, added to the gradient like PyTorch's SGD
#     `weight_decay` (biases and batch-norm scales are not decayed).

def learning_rate_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate at each step: constant, or a rise then a decay over the whole run."""
    if config.lr_schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    total_steps = config.num_epochs * steps_per_epoch
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps - 1)
    if config.lr_schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, config.learning_rate, pct_start=warmup_steps / total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup_steps, decay_steps=total_steps,
        end_value=0.0,
    )


def _is_kernel(params):
    """True for convolution and 1x1 (dense) kernels, the only parameters weight decay applies to."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def create_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    # A constant rate is passed as a number, which keeps the reference's optimizer state that of `optax.sgd(0.1)`.
    constant = config.lr_schedule == "constant"
    learning_rate = config.learning_rate if constant else learning_rate_schedule(config, steps_per_epoch)
    sgd = optax.sgd(learning_rate, momentum=config.momentum or None, nesterov=config.nesterov)
    if not config.weight_decay:
        return sgd
    return optax.chain(optax.masked(optax.add_decayed_weights(config.weight_decay), _is_kernel), sgd)


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the key that dropout masks are derived from and the batch-norm
    running statistics (an empty dict for the book's NiN, which has none).

    Each step's random key is `fold_in(dropout_key, step)`: a pure function of the state, so a
    resumed run draws exactly the masks an uninterrupted one would.
    """

    dropout_key: jax.Array
    batch_stats: Any

    def variables(self) -> dict[str, Any]:
        """The variables that the model applies, in training, evaluation and prediction."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(config: Config, steps_per_epoch: Optional[int] = None) -> TrainState:
    """Initial parameters, optimizer state and random key, all drawn from `config.seed`.
    `steps_per_epoch` sets the length of a learning-rate schedule (default: the published split's).

    NiN's variables do not depend on the image size (no layer's shape does), so the model is
    initialised at the smallest size it takes, whatever `config.resize`: one compiled initializer,
    and one entry of the compilation cache, serves every size. The dense head's do (`--head dense`)."""
    model = create_model(config)
    params_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    size = config.resize if config.head == "dense" else MIN_INPUT_SIZE
    variables = jax.jit(model.init)(params_key, jnp.zeros((1, size, size, 1), jnp.float32))
    steps_per_epoch = steps_per_epoch or input_pipeline.num_batches(
        min(config.train_examples or input_pipeline.TRAIN_SIZE, input_pipeline.TRAIN_SIZE), config.batch_size)
    return TrainState.create(apply_fn=model.apply, tx=create_optimizer(config, steps_per_epoch),
                             dropout_key=jax.random.key_data(dropout_key), params=variables["params"],
                             batch_stats=variables.get("batch_stats", {}))


def preprocess(images: jax.Array, resize: int, dtype=jnp.float32) -> jax.Array:
    """uint8 [B, 28, 28, 1] -> `dtype` [B, resize, resize, 1] in [0, 1], resized bilinearly like the
    book's `transforms.Resize`. Runs inside the jitted step, on the accelerator, in `dtype`: in bf16
    the resize's two matrix products run on the accelerator's bf16 units, not as float32 at the
    highest precision, and the images come out rounded to bf16 as before."""
    images = images.astype(dtype) / 255
    if images.shape[1:3] != (resize, resize):
        images = jax.image.resize(images, (images.shape[0], resize, resize, images.shape[3]), "bilinear")
    return images.astype(dtype)


def summed_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array, label_smoothing: float = 0.0) -> Metrics:
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
    """Where a running sum of step metrics starts, like the book's `Accumulator(3)`; float32 like the steps' sums."""
    return {name: np.zeros((), np.float32) for name in METRIC_NAMES}


def add_metrics(totals: Metrics, metrics: Metrics) -> Metrics:
    return {name: totals[name] + metrics[name] for name in METRIC_NAMES}


def sum_over_devices(tree: Any, axis_name: Optional[str]) -> Any:
    """`tree` summed over the devices of a pmap's `axis_name`; as it is under jit (None)."""
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def train_step(state: TrainState, batch: input_pipeline.Batch, *, resize: int, dtype: Any = jnp.float32,
               label_smoothing: float = 0.0, axis_name: Optional[str] = None) -> tuple[TrainState, Metrics]:
    """One optimizer step on the mean cross-entropy of the batch's real (unmasked) examples.

    Batch-norm statistics are those of the real examples of the whole batch, summed over the
    devices inside the model, so every replica computes the same running averages.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    if axis_name is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    dropout_key = jax.random.split(key)[0]  # the first of two, as ever: the masks of a run never change
    images = preprocess(batch["image"], resize, dtype)

    def summed_loss(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                         mask=batch["mask"], axis_name=axis_name, rngs={"dropout": dropout_key},
                                         mutable=["batch_stats"])
        metrics = summed_metrics(logits, batch["label"], batch["mask"], label_smoothing)
        return metrics["loss_sum"], (metrics, updates.get("batch_stats", state.batch_stats))

    grads, (metrics, batch_stats) = jax.grad(summed_loss, has_aux=True)(state.params)
    grads, metrics = sum_over_devices((grads, metrics), axis_name)
    grads = jax.tree_util.tree_map(lambda g: g / metrics["count"], grads)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def eval_step(state: TrainState, batch: input_pipeline.Batch, *, resize: int, dtype: Any = jnp.float32,
              axis_name: Optional[str] = None) -> Metrics:
    """Summed loss, correct predictions and real-example count of one padded batch."""
    logits = state.apply_fn(state.variables(), preprocess(batch["image"], resize, dtype), train=False)
    return sum_over_devices(summed_metrics(logits, batch["label"], batch["mask"]), axis_name)


def step_functions(config: Config, axis_name: Optional[str] = None):
    """`train_step` and `eval_step` bound to the config's resize, dtype and training options."""
    bound = dict(resize=config.resize, dtype=jnp.dtype(config.dtype), axis_name=axis_name)
    return (functools.partial(train_step, **bound, label_smoothing=config.label_smoothing),
            functools.partial(eval_step, **bound))
