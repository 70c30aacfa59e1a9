"""Which kernels compute NiN's layers on each backend: the choices measured fastest on CPUs and GPUs.

Each choice changes how XLA computes the same function, never the function or the parameters:

  * `--max_pool`: `slices`, NiN's max-pools as strided slices with a first-maximum gradient,
    `indexed`, the same slices that also keep where each maximum was, for a gradient that reads
    one byte per output instead of the input, or `reduce_window`, Flax's `nn.max_pool` (pooling.py);
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

# Where a choice was measured to help, `auto` makes it; every other backend gets XLA's plain ops.
_MEASURED = {"cpu": {"max_pool": "slices", "conv1x1": "dot", "pool_order": "relu_then_pool"},
             "gpu": {"max_pool": "indexed", "conv1x1": "conv", "pool_order": "pool_then_relu"}}
_PLAIN = {"max_pool": "reduce_window", "conv1x1": "conv", "pool_order": "relu_then_pool"}
CHOICES = {"max_pool": ("auto", "slices", "indexed", "reduce_window"), "conv1x1": ("auto", "dot", "conv"),
           "pool_order": ("auto", "relu_then_pool", "pool_then_relu")}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """How NiN's layers are computed: one `--max_pool`, `--conv1x1` and `--pool_order` choice each."""

    max_pool: str = "auto"
    conv1x1: str = "auto"
    pool_order: str = "auto"

    def resolved(self, platform: Optional[str] = None) -> "Kernels":
        """Every `auto` made the choice for `platform` (default: JAX's default backend)."""
        return Kernels(**{lever: resolve(lever, getattr(self, lever), platform) for lever in _PLAIN})


DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"


def make_deterministic() -> None:
    """Adds XLA's flag for GPU kernels that repeat bit for bit (no atomic adds in reductions and
    scatters, autotuning among deterministic kernels only) to XLA_FLAGS. XLA reads XLA_FLAGS once,
    as the backend starts: call this before JAX computes anything, as train.py does."""
    flags = os.environ.get("XLA_FLAGS", "")
    if DETERMINISTIC_XLA_FLAG not in flags.split():
        os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_XLA_FLAG}".strip()


def is_deterministic() -> bool:
    """Whether XLA_FLAGS asks for the deterministic GPU kernels."""
    return DETERMINISTIC_XLA_FLAG in os.environ.get("XLA_FLAGS", "").split()


def resolve(lever: str, choice: str, platform: Optional[str] = None) -> str:
    """The concrete choice for `lever` ('max_pool', 'conv1x1' or 'pool_order'): `choice` itself unless it is
    'auto', which picks by the platform the steps compile for (default: JAX's default backend)."""
    if choice != "auto":
        return choice
    return _MEASURED.get(platform or jax.default_backend(), _PLAIN)[lever]


def for_platform(config, platform: str):
    """`config` with every choice's 'auto' made the choice for `platform`: for compiling steps for
    devices other than the default backend's (`python -m nin_jax.plan`)."""
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


