"""NiN's 3x3/2 max-pools in the forms a CPU or GPU computes fastest: the same outputs as Flax's
`nn.max_pool` exactly, and gradients equal to float32 rounding (`choices.py` says which form runs where).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# ---------------------------------------------------------------------------------------------
# --max_pool slices. Max pooling written as slices, with a gradient that XLA's CPU backend runs faster.
#
# `nn.max_pool` lowers to `reduce_window`, whose gradient is `select_and_scatter`. On the CPU XLA
# runs that scatter element by element, slower than the pools' neighbouring convolutions; written
# as here, it fuses (docs/performance.md has the timings of benchmarks/pool_levers.py).
#
# A window is the maximum of its k*k strided slices, an elementwise chain XLA fuses. The gradient
# routes each output gradient to the first maximum of its window in row-major order, the element
# `select_and_scatter` picks, and adds the contributions of overlapping windows with strided pads,
# which fuse too. Outputs are those of `nn.max_pool` exactly, gradients equal to float32 rounding
# (overlaps are summed in another order). NiN uses it where `--max_pool` says:
# by default on the CPU, where it was measured.

def _output_size(size: int, window: int, stride: int) -> int:
    return (size - window) // stride + 1


def _window_slices(x: jax.Array, window: int, stride: int) -> list[jax.Array]:
    """The window*window strided slices of x (NHWC), one per position in the window, row-major.
    Slice (i, j) holds element (i, j) of every window."""
    out_h, out_w = (_output_size(size, window, stride) for size in x.shape[1:3])
    return [
        x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride, :]
        for i in range(window)
        for j in range(window)
    ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool_slices(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
    """`nn.max_pool(x, (window, window), (stride, stride), 'VALID')` on NHWC images."""
    return functools.reduce(jnp.maximum, _window_slices(x, window, stride))


def _max_pool_forward(x, window, stride):
    return max_pool_slices(x, window, stride), x


def _max_pool_backward(window, stride, x, grad):
    # The maxima are found again, from one materialised copy of x: XLA may recompute x's producer
    # (say batch norm and ReLU) inside each fusion that reads it, rounded differently from the
    # forward pass, and a window whose saved maximum equals none of its recomputed elements would
    # route its gradient nowhere.
    x = lax.optimization_barrier(x)
    pooled = max_pool_slices(x, window, stride)
    routed = jnp.zeros(pooled.shape, bool)  # windows whose gradient has gone to an earlier maximum
    contributions = []
    for candidate in _window_slices(x, window, stride):
        first_max = (candidate == pooled) & ~routed
        routed = routed | first_max
        contributions.append(jnp.where(first_max, grad, jnp.zeros((), grad.dtype)))
    return (_scatter_to_windows(contributions, window, stride, x.shape),)


def _scatter_to_windows(contributions: list[jax.Array], window: int, stride: int, shape) -> jax.Array:
    """The transpose of `_window_slices`: each slice's values put back at their places in an array
    of `shape`, zeros between, and the overlaps added; strided pads, which XLA fuses."""
    height, width = shape[1:3]
    out_h, out_w = contributions[0].shape[1:3]
    zero = jnp.zeros((), contributions[0].dtype)
    total = jnp.zeros(shape, contributions[0].dtype)
    for position, contribution in enumerate(contributions):
        i, j = divmod(position, window)
        padding = (
            (0, 0, 0),
            (i, height - i - stride * (out_h - 1) - 1, stride - 1),
            (j, width - j - stride * (out_w - 1) - 1, stride - 1),
            (0, 0, 0),
        )
        total = total + lax.pad(contribution, zero, padding)
    return total


max_pool_slices.defvjp(_max_pool_forward, _max_pool_backward)


# ---------------------------------------------------------------------------------------------
# --max_pool indexed. Max pooling that keeps, for its gradient, where each window's maximum was.
#
# The forward pass is the slices' elementwise chain, which also records the position in the window
# (0 to window*window - 1, row-major) of the first maximum, one byte per output. The gradient then
# needs neither the input nor a second search for the maxima: it reads the output gradient and the
# positions, a ninth of the input's elements each, and scatters with the same strided pads. Outputs
# and gradients are those of `max_pool_slices` above.

def max_pool_indexed(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
    """`nn.max_pool(x, (window, window), (stride, stride), 'VALID')` on NHWC images."""
    return _indexed_max_pool(x, window, stride, x.shape)


def _max_and_position(x: jax.Array, window: int, stride: int) -> tuple[jax.Array, jax.Array]:
    slices = _window_slices(x, window, stride)
    pooled, position = slices[0], jnp.zeros(slices[0].shape, jnp.uint8)
    for index, candidate in enumerate(slices[1:], 1):
        position = jnp.where(candidate > pooled, jnp.uint8(index), position)  # the first maximum stays
        pooled = jnp.maximum(pooled, candidate)
    return pooled, position


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _indexed_max_pool(x: jax.Array, window: int, stride: int, shape: tuple[int, ...]) -> jax.Array:
    return functools.reduce(jnp.maximum, _window_slices(x, window, stride))


def _indexed_max_pool_forward(x, window, stride, shape):
    pooled, position = _max_and_position(x, window, stride)
    return pooled, position


def _indexed_max_pool_backward(window, stride, shape, position, grad):
    zero = jnp.zeros((), grad.dtype)
    contributions = [jnp.where(position == index, grad, zero) for index in range(window * window)]
    return (_scatter_to_windows(contributions, window, stride, shape),)


_indexed_max_pool.defvjp(_indexed_max_pool_forward, _indexed_max_pool_backward)


def max_pool(x: jax.Array, form: str) -> jax.Array:
    """The book's `nn.MaxPool2d(3, stride=2)` on NHWC images, computed as `form` says: slices,
    indexed or reduce_window (Flax's `nn.max_pool`), a `--max_pool` choice that `choices.resolve` made."""
    if form == "slices":
        return max_pool_slices(x, 3, 2)
    if form == "indexed":
        return max_pool_indexed(x, 3, 2)
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")
