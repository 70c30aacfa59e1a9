"""Max pooling written as slices, with a gradient that XLA's CPU backend runs faster.

`nn.max_pool` lowers to `reduce_window`, whose gradient is `select_and_scatter`. On the CPU XLA
runs that scatter element by element, slower than the pools' neighbouring convolutions; written
as here, it fuses (docs/performance.md has the timings of benchmarks/pool_levers.py).

A window is the maximum of its k*k strided slices, an elementwise chain XLA fuses. The gradient
routes each output gradient to the first maximum of its window in row-major order, the element
`select_and_scatter` picks, and adds the contributions of overlapping windows with strided pads,
which fuse too. Outputs are those of `nn.max_pool` exactly, gradients equal to float32 rounding
(overlaps are summed in another order). NiN uses it where `--max_pool` says (nin_jax/levers.py):
by default on the CPU, where it was measured.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax


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
def max_pool(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
    """`nn.max_pool(x, (window, window), (stride, stride), 'VALID')` on NHWC images."""
    return functools.reduce(jnp.maximum, _window_slices(x, window, stride))


def _max_pool_forward(x, window, stride):
    return max_pool(x, window, stride), x


def _max_pool_backward(window, stride, x, grad):
    # The maxima are found again, from one materialised copy of x: XLA may recompute x's producer
    # (say batch norm and ReLU) inside each fusion that reads it, rounded differently from the
    # forward pass, and a window whose saved maximum equals none of its recomputed elements would
    # route its gradient nowhere.
    x = lax.optimization_barrier(x)
    pooled = max_pool(x, window, stride)
    height, width = x.shape[1:3]
    out_h, out_w = pooled.shape[1:3]
    zero = jnp.zeros((), x.dtype)
    grad_x = jnp.zeros_like(x)
    routed = jnp.zeros(pooled.shape, bool)  # windows whose gradient has gone to an earlier maximum
    for position, candidate in enumerate(_window_slices(x, window, stride)):
        i, j = divmod(position, window)
        first_max = (candidate == pooled) & ~routed
        routed = routed | first_max
        # The transpose of the strided slice: put each value back at its place in x, zeros between.
        padding = (
            (0, 0, 0),
            (i, height - i - stride * (out_h - 1) - 1, stride - 1),
            (j, width - j - stride * (out_w - 1) - 1, stride - 1),
            (0, 0, 0),
        )
        grad_x = grad_x + lax.pad(jnp.where(first_max, grad, zero), zero, padding)
    return (grad_x,)


max_pool.defvjp(_max_pool_forward, _max_pool_backward)
