"""The XLA compiler option that makes NiN's training step fast on a CPU: a measured choice.

XLA hands convolutions, dots, reductions and elementwise work to the YNNPACK
library on the CPU. For NiN its convolutions, the backward ones above all, are slower than XLA's
own Eigen kernels, while YNNPACK's reductions (the bias gradients) are the faster ones, so handing
YNNPACK the reductions only makes the training step fastest (docs/performance.md has the
measurements). The option changes which kernels compute the same function, not the function.

`--cpu_kernels default` keeps XLA's own choice. GPUs and TPUs never see the option; nor does an
XLA that does not know it (the option is experimental), which then runs its default. `jax.pmap`
takes no compiler options, so `--parallel pmap` on CPU devices runs the default too.
"""

import functools
from typing import Optional

import jax

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
