"""Which kernels compute NiN on each backend: the choices measured fastest on CPUs and GPUs.

Each lever changes how XLA computes the same function, never the function or the parameters:

  * `--max_pool`: `slices`, NiN's max-pools as strided slices with a first-maximum gradient
    (`max_pool` below), `indexed`, the same slices that also keep where each maximum was, for a
    gradient that reads one byte per output instead of the input (`max_pool_indexed`), or
    `reduce_window`, Flax's `nn.max_pool`;
  * `--conv1x1`: the 1x1 convolutions as a `dot` over channels or as a `conv`; the layer's
    kernel is the same (inputs, outputs) matrix either way, so checkpoints do not depend on it;
  * `--pool_order`: each block's last ReLU before its max-pool, as the book has it, or after it,
    on a quarter of the elements (ReLU and max-pool commute);
  * `--cpu_kernels` (`compiler_options` below): an option of XLA's CPU compiler only;
  * `--deterministic` (`make_deterministic` below): XLA's deterministic GPU kernels.

`auto` is the measured choice on the CPU (`slices`, `dot`, `relu_then_pool`), the choice of fewest
bytes in the program compiled for GPUs (`indexed`, `conv`, `pool_then_relu`: docs/performance.md;
benchmarks/accelerator.sh times every form), and XLA's plain ops in the book's order on TPUs,
where nothing has been measured.
"""

import dataclasses
import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from nin_jax.errors import ConfigError

# Where a lever was measured to help, `auto` turns it on; every other backend gets XLA's plain ops.
_MEASURED = {"cpu": {"max_pool": "slices", "conv1x1": "dot", "pool_order": "relu_then_pool"},
             "gpu": {"max_pool": "indexed", "conv1x1": "conv", "pool_order": "pool_then_relu"}}
_PLAIN = {"max_pool": "reduce_window", "conv1x1": "conv", "pool_order": "relu_then_pool"}


DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"


def make_deterministic() -> None:
    """Adds XLA's flag for GPU kernels that repeat bit for bit (no atomic adds in reductions and
    scatters, autotuning among deterministic kernels only) to XLA_FLAGS. XLA reads XLA_FLAGS once,
    as the backend starts: call this before JAX computes anything, as train.py does."""
    flags = os.environ.get("XLA_FLAGS", "")
    if DETERMINISTIC_XLA_FLAG not in flags.split():
        os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_XLA_FLAG}".strip()


def check_deterministic(config) -> None:
    """Refuses `--deterministic` where XLA_FLAGS lacks the flag: the run would repeat less than it says."""
    if config.deterministic and DETERMINISTIC_XLA_FLAG not in os.environ.get("XLA_FLAGS", "").split():
        raise ConfigError(f"--deterministic needs {DETERMINISTIC_XLA_FLAG} in XLA_FLAGS before JAX starts: call "
                          f"nin_jax.kernels.make_deterministic() first, as train.py does")


def resolve(lever: str, choice: str, platform: Optional[str] = None) -> str:
    """The concrete choice for `lever` ('max_pool', 'conv1x1' or 'pool_order'): `choice` itself unless it is
    'auto', which picks by the platform the steps compile for (default: JAX's default backend)."""
    if choice != "auto":
        return choice
    return _MEASURED.get(platform or jax.default_backend(), _PLAIN)[lever]


def for_platform(config, platform: str):
    """`config` with every lever's 'auto' made the choice for `platform`: for compiling steps for
    devices other than the default backend's (`nin_jax.plan`)."""
    return dataclasses.replace(config, **{lever: resolve(lever, getattr(config, lever), platform) for lever in _PLAIN})


# ---------------------------------------------------------------------------------------------
# --cpu_kernels. The XLA compiler option that makes NiN's training step fast on a CPU: a measured choice.
#
# XLA hands convolutions, dots, reductions and elementwise work to the YNNPACK
# library on the CPU. For NiN its convolutions, the backward ones above all, are slower than XLA's
# own Eigen kernels, while YNNPACK's reductions (the bias gradients) are the faster ones, so handing
# YNNPACK the reductions only makes the training step fastest (docs/performance.md has the
# measurements). The option changes which kernels compute the same function, not the function.
#
# `--cpu_kernels default` keeps XLA's own choice. GPUs and TPUs never see the option; nor does an
# XLA that does not know it (the option is experimental), which then runs its default. `jax.pmap`
# takes no compiler options, so `--parallel pmap` on CPU devices runs the default too.

TUNED_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(cpu_kernels: str, platform: Optional[str] = None) -> Optional[dict[str, str]]:
    """The `compiler_options` for `jax.jit` that `--cpu_kernels` asks for on `platform` (default:
    JAX's default backend)."""
    if cpu_kernels == "default" or (platform or jax.default_backend()) != "cpu" or not _xla_knows_tuned_options():
        return None
    return dict(TUNED_OPTIONS)


@functools.cache
def _xla_knows_tuned_options() -> bool:
    try:
        jax.jit(lambda: 0, compiler_options=TUNED_OPTIONS).lower().compile()
    except (RuntimeError, TypeError):  # unknown option or value; a jax.jit without compiler_options
        return False
    return True


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


max_pool.defvjp(_max_pool_forward, _max_pool_backward)


# ---------------------------------------------------------------------------------------------
# --max_pool indexed. Max pooling that keeps, for its gradient, where each window's maximum was.
#
# The forward pass is the slices' elementwise chain, which also records the position in the window
# (0 to window*window - 1, row-major) of the first maximum, one byte per output. The gradient then
# needs neither the input nor a second search for the maxima: it reads the output gradient and the
# positions, a ninth of the input's elements each, and scatters with the same strided pads. Outputs
# and gradients are those of `max_pool` above.

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
