"""The optimizer: the book's plain SGD, or SGD with the parts of a stronger recipe switched on.

Every part is off in the reference recipe (`Config()`), which leaves `optax.sgd(0.1)`:
  * momentum, optionally Nesterov's;
  * a learning-rate schedule: linear warm-up from 0, then cosine decay to 0 at the last step; or
    optax's one-cycle, which rises over the warm-up from a 25th of the peak, then decays;
  * L2 weight decay on the convolution kernels, added to the gradient like PyTorch's SGD
    `weight_decay` (biases and batch-norm scales are not decayed).
"""

import jax
import optax

from nin_jax import input_pipeline
from nin_jax.config import Config


def default_steps_per_epoch(config: Config) -> int:
    """Steps per epoch over the published training set, or its first `train_examples`."""
    examples = min(config.train_examples or input_pipeline.TRAIN_SIZE, input_pipeline.TRAIN_SIZE)
    return input_pipeline.num_batches(examples, config.batch_size)


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

