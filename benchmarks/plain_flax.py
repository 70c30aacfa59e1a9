"""The book's NiN as a JAX user would first write it: every convolution an `nn.Conv` (the 1x1 ones
too), every ReLU `nn.relu` where the book has it, every pool `nn.max_pool`, a jitted SGD step on
images already resized. tests/test_models.py checks that nin_jax's model computes this function
with these parameters; benchmarks/step_throughput.py --model plain times this step beside nin_jax's,
as the baseline that nin_jax's rewrites are measured against.
"""

import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nin_jax.ops.batch_norm import MaskedBatchNorm


def pool(x):
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class PlainNiN(nn.Module):
    """With `batch_norm`, nin_jax's masked batch normalisation after every convolution."""

    batch_norm: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        def layer(x, name, features, kernel_size, strides=1, padding=0):
            pad = ((padding, padding), (padding, padding))
            x = nn.Conv(features, (kernel_size,) * 2, (strides,) * 2, pad, use_bias=not self.batch_norm,
                        dtype=self.dtype, name=name)(x)
            if self.batch_norm:
                x = MaskedBatchNorm(dtype=self.dtype, name=f"{name}_bn")(x, train=True, mask=mask)
            return nn.relu(x)

        def block(x, name, features, kernel_size, strides, padding):
            x = layer(x, f"{name}/conv", features, kernel_size, strides, padding)
            x = layer(x, f"{name}/conv1x1_1", features, 1)
            return layer(x, f"{name}/conv1x1_2", features, 1)

        x = pool(block(x, "block1", 96, 11, 4, 0))
        x = pool(block(x, "block2", 256, 5, 1, 2))
        x = pool(block(x, "block3", 384, 3, 1, 1))
        return block(x, "block4", 10, 3, 1, 1).mean(axis=(1, 2)).astype(jnp.float32)


def step_timer(resize: int, batch_size: int, dtype: str):
    """The plain train step on a fixed batch of random images at `resize` px: (compile seconds, a
    function that runs one step and returns its loss)."""
    model = PlainNiN(dtype=jnp.dtype(dtype))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((batch_size, resize, resize, 1), np.float32), dtype)
    labels = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
    params = model.init(jax.random.key(0), images[:1])["params"]
    tx = optax.sgd(0.1)

    def train_step(params, opt_state, images, labels):
        def loss(params):
            logits = model.apply({"params": params}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value

    start = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, tx.init(params), images, labels).compile()
    compile_seconds = time.perf_counter() - start
    state = [params, tx.init(params)]

    def step():
        state[0], state[1], value = compiled(state[0], state[1], images, labels)
        return value

    return compile_seconds, step
