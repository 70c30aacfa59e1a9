"""`pooling.max_pool_slices` and `pooling.max_pool_indexed` are `nn.max_pool`: the same outputs, and
gradients routed to the same elements."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nin_jax.ops import pooling


def reference(x, window, stride):
    return nn.max_pool(x, (window, window), (stride, stride), "VALID")


POOLS = [pooling.max_pool_slices, pooling.max_pool_indexed]


def check_against_reference(pool, x, window, stride):
    pooled, pool_vjp = jax.vjp(lambda x: pool(x, window, stride), x)
    expected, reference_vjp = jax.vjp(lambda x: reference(x, window, stride), x)
    cotangent = jax.random.normal(jax.random.key(1), expected.shape, x.dtype)
    np.testing.assert_array_equal(pooled, expected)
    # Overlapping windows add their contributions in another order: equal to float32 rounding.
    np.testing.assert_allclose(pool_vjp(cotangent)[0], reference_vjp(cotangent)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, window, stride", [
    ((2, 54, 54, 3), 3, 2),  # pool1's geometry at 224 px
    ((2, 13, 13, 4), 3, 2),
    ((2, 12, 12, 4), 3, 2),  # even sizes leave the last row and column out of every window
    ((1, 9, 11, 2), 2, 2),  # non-overlapping, non-square
    ((1, 10, 10, 2), 3, 1),  # maximal overlap
])
@pytest.mark.parametrize("pool", POOLS)
def test_matches_nn_max_pool_on_random_inputs(pool, shape, window, stride):
    check_against_reference(pool, jax.random.normal(jax.random.key(0), shape), window, stride)


@pytest.mark.parametrize("pool", POOLS)
def test_ties_route_the_gradient_to_the_first_maximum_like_nn_max_pool(pool):
    """After a ReLU most windows hold several zeros: every tie must go where XLA sends it."""
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 26, 26, 8)) - 1.0)
    assert float((x == 0).mean()) > 0.8
    check_against_reference(pool, x, 3, 2)
    constant = jnp.ones((1, 7, 7, 1))
    grad = jax.grad(lambda x: pool(x, 3, 2).sum())(constant)[0, :, :, 0]
    expected = np.zeros((7, 7))
    expected[0:5:2, 0:5:2] = 1.0  # each of the 3x3 windows gives its gradient to its top-left element
    np.testing.assert_array_equal(grad, expected)


@pytest.mark.parametrize("pool", POOLS)
def test_bfloat16_and_jit(pool):
    x = jax.random.normal(jax.random.key(0), (2, 26, 26, 4), jnp.bfloat16)
    pooled = jax.jit(pool, static_argnums=(1, 2))(x, 3, 2)
    assert pooled.dtype == jnp.bfloat16
    np.testing.assert_array_equal(pooled, reference(x, 3, 2))
    grad = jax.jit(jax.grad(lambda x: pool(x, 3, 2).astype(jnp.float32).sum()))(x)
    expected = jax.grad(lambda x: reference(x, 3, 2).astype(jnp.float32).sum())(x)
    np.testing.assert_array_equal(grad, expected)


def test_the_indexed_gradient_reads_one_byte_per_output_and_not_the_input():
    """What the indexed pool keeps for its gradient: the positions, uint8, of the output's shape."""
    x = jax.random.normal(jax.random.key(0), (2, 13, 13, 4))
    _, residuals = jax.vjp(lambda x: pooling.max_pool_indexed(x, 3, 2), x)
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(residuals) if hasattr(leaf, "dtype")]
    assert [(leaf.dtype, leaf.shape) for leaf in leaves if leaf.size > 1] == [(jnp.uint8, (2, 6, 6, 4))]
