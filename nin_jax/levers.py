"""Which kernels compute NiN on each backend: choices measured to help on the CPU, off elsewhere.

Each lever changes how XLA computes the same function, never the function or the parameters:

  * `--max_pool`: `slices`, NiN's max-pools as strided slices with a first-maximum gradient
    (`nin_jax/pooling.py`), or `reduce_window`, Flax's `nn.max_pool`;
  * `--conv1x1`: the 1x1 convolutions as a `dot` over channels or as a `conv`; the layer's
    kernel is the same (inputs, outputs) matrix either way, so checkpoints do not depend on it;
  * `--cpu_kernels` (`nin_jax/xla_cpu.py`): an option of XLA's CPU compiler only.

`auto` is the measured choice on the CPU (`slices`, `dot`) and XLA's plain ops on GPUs and TPUs
(`reduce_window`, `conv`), until `benchmarks/accelerator.sh` has measured them there.
"""

import dataclasses
from typing import Optional

import jax

# Where a lever was measured to help, `auto` turns it on; every other backend gets XLA's plain ops.
_MEASURED = {"cpu": {"max_pool": "slices", "conv1x1": "dot"}}
_PLAIN = {"max_pool": "reduce_window", "conv1x1": "conv"}


def resolve(lever: str, choice: str, platform: Optional[str] = None) -> str:
    """The concrete choice for `lever` ('max_pool' or 'conv1x1'): `choice` itself unless it is
    'auto', which picks by the platform the steps compile for (default: JAX's default backend)."""
    if choice != "auto":
        return choice
    return _MEASURED.get(platform or jax.default_backend(), _PLAIN)[lever]


def for_platform(config, platform: str):
    """`config` with every lever's 'auto' made the choice for `platform`: for compiling steps for
    devices other than the default backend's (`nin_jax.plan`)."""
    return dataclasses.replace(config, **{lever: resolve(lever, getattr(config, lever), platform) for lever in _PLAIN})
