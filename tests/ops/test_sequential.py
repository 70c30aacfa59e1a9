"""The fast model is the straightforward one: NiN as computed (nin_jax/ops/sequential.py and the
layers it chains) against plain nn.Conv, nn.relu and nn.max_pool (benchmarks/plain_flax.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.plain_flax import PlainNiN
from nin_jax import models, ops

from conftest import float64


def as_conv_variables(variables):
    """models.NiN's variables under PlainNiN's names, 1x1 kernels reshaped to [1, 1, in, out]."""
    return {
        collection: {
            f"{block}/{layer}": {name: value.reshape((1, 1) + value.shape) if name == "kernel" and value.ndim == 2
                                 else value for name, value in leaves.items()}
            for block, layers in tree.items() for layer, leaves in layers.items()
        }
        for collection, tree in variables.items()
    }


@pytest.mark.parametrize("max_pool, conv1x1, pool_order, size, batch_norm", [
    ("slices", "dot", "relu_then_pool", 67, False),  # the CPU's levers, at the smallest size
    ("indexed", "conv", "pool_then_relu", 75, False),  # the GPU's; sizes not multiples of the stem's stride
    ("reduce_window", "conv", "pool_then_relu", 98, False),
    ("indexed", "dot", "pool_then_relu", 71, True),  # the strong recipe's batch norm
])
def test_the_fast_model_computes_the_straightforward_convolutional_nin(max_pool, conv1x1, pool_order, size,
                                                                        batch_norm):
    """Same weights, same outputs and same gradients as plain nn.Conv layers, nn.relu and
    nn.max_pool in the book's order (tests/ops/test_choices.py checks every lever in float32), on a
    padded batch: the stem as space-to-depth, the ReLUs after the pools and with their gradient
    from their outputs, the class block on 16 channels, each pool's gradient. In float64, where
    the two agree to 1e-15, so that rounding cannot hide a difference: in float32 batch norm over
    three examples magnifies the rounding of the two orders of summation to 1e-4."""
    with float64():
        images = jax.random.uniform(jax.random.key(1), (5, size, size, 1), jnp.float64)
        mask = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0], jnp.float64)  # a last batch of 3, padded to 5
        model = models.NiN(kernels=ops.Kernels(max_pool, conv1x1, pool_order), batch_norm=batch_norm,
                           dropout_rate=0.0, dtype=jnp.float64)
        variables = model.init(jax.random.key(0), images)
        keys = iter(jax.random.split(jax.random.key(2), 100))
        # Every parameter nonzero (the default class layer starts at zero), so every gradient path is live.
        params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape, jnp.float64),
                                        variables["params"])
        stats = variables.get("batch_stats", {})
        cotangent = (jax.random.normal(jax.random.key(3), (5, 10)) * mask[:, None]).astype(jnp.float32)

        def fast(params):
            logits, _ = model.apply({"params": params, "batch_stats": stats}, images, train=batch_norm, mask=mask,
                                    mutable=["batch_stats"])
            return logits

        def straightforward(params):
            converted = as_conv_variables({"params": params, "batch_stats": stats})
            logits, _ = PlainNiN(batch_norm, jnp.float64).apply(converted, images, mask, mutable=["batch_stats"])
            return logits

        # Compiled, where op by op the pools' many small operations cost more time than the arithmetic;
        # with batch norm op by op, so that its float32 statistics are rounded alike in both.
        compile = (lambda f: f) if batch_norm else jax.jit
        logits, fast_vjp = jax.vjp(compile(fast), params)
        expected, straightforward_vjp = jax.vjp(compile(straightforward), params)
        grads, expected_grads = fast_vjp(cotangent)[0], straightforward_vjp(cotangent)[0]
    assert jax.tree_util.tree_map(lambda leaf: leaf.dtype, grads) == jax.tree_util.tree_map(lambda leaf: leaf.dtype,
                                                                                             params)
    assert np.abs(expected[:3]).max() > 0
    np.testing.assert_allclose(logits[:3], expected[:3], rtol=1e-6)
    for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
        expected_grad = functools.reduce(lambda tree, key: tree[key.key], path, expected_grads)
        assert np.abs(expected_grad).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-12 * np.abs(expected_grad).max(),
                                   err_msg=jax.tree_util.keystr(path))
