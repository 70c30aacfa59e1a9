"""The book's `nn.Sequential` for Flax: a list of layers as the book names them (`Conv`, `relu`,
`MaxPool`, `Dropout`, ...), each computed in the form that `Kernels` picks for the device.

`models.py` says what NiN computes; `Layers.run` decides how, without changing the function or the
parameters (tests/test_ops.py holds every form against plain `nn.Conv`, `nn.relu` and `nn.max_pool`):

  * a `Conv` becomes `layers.Conv`, or for a 1x1 kernel `layers.Conv1x1` (with `nn.Dense`'s kernel
    shape, as checkpoints hold it), computing the channels padded to a multiple of 16 that tensor
    cores take; the padding stays zero between the layers of one sequence and is cut off at its end;
  * with `batch_norm`, each convolution has no bias and a `MaskedBatchNorm` named `<conv>_bn`
    after it, whose statistics are those of the batch's real examples (`mask`) on all devices;
  * a block followed by a `MaxPool` leaves its last ReLU to run after the pool where `pool_order`
    says so, on a quarter of the elements (ReLU and max-pool commute);
  * each layer's output is sown as `<position>_<name>` into `sow_into`'s 'intermediates', for the
    book's shape printout (`models.layer_summary`).
"""

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nin_jax.ops import layers, pooling
from nin_jax.ops.batch_norm import MaskedBatchNorm
from nin_jax.ops.choices import Kernels
from nin_jax.ops.layers import Initializer, relu


@dataclasses.dataclass(frozen=True)
class Conv:
    """`nn.Conv(features, (kernel_size, kernel_size), strides, padding)` on NHWC images."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    name: str = "conv"


@dataclasses.dataclass(frozen=True)
class MaxPool:
    """The book's `nn.MaxPool2d(3, stride=2)`."""

    name: str = "max_pool"


@dataclasses.dataclass(frozen=True)
class Dropout:
    """`nn.Dropout(rate)`, active in training only."""

    rate: float
    name: str = "dropout"


@dataclasses.dataclass(frozen=True)
class GlobalAvgPool:
    """The book's `nn.AdaptiveAvgPool2d((1, 1))`: each map's mean, keeping the 1x1 map."""

    name: str = "global_avg_pool"


@dataclasses.dataclass(frozen=True)
class GlobalMaxPool:
    """`nn.AdaptiveMaxPool2d((1, 1))`: each map's maximum, keeping the 1x1 map (an exercise's head)."""

    name: str = "global_max_pool"


@dataclasses.dataclass(frozen=True)
class Flatten:
    """The book's `nn.Flatten()`."""

    name: str = "flatten"


@dataclasses.dataclass(frozen=True)
class Dense:
    """`nn.LazyLinear(features)`: a fully connected layer on flattened inputs (an exercise's head)."""

    features: int
    name: str = "dense"


@dataclasses.dataclass(frozen=True)
class Layers:
    """How a sequence of layers is computed: the compute dtype, the batch-norm variant, the kernels."""

    dtype: Any = jnp.float32
    batch_norm: bool = False
    kernels: Kernels = Kernels()

    def run(self, x: jax.Array, sequence: Sequence[Any], *, train: bool = False, mask: Optional[jax.Array] = None,
            axis_name: Optional[str] = None, relu_last: bool = True,
            sow_into: Optional[nn.Module] = None) -> jax.Array:
        """`sequence` applied to `x`; Flax modules in it (NiN's blocks) are called with the same
        `train`, `mask` and `axis_name`. With `relu_last=False` a final `relu` is left to the caller."""
        kernels = self.kernels.resolved()
        channels = x.shape[-1]  # x's own channels; the layers may carry zero channels beyond them
        relu_after_pool = False
        for position, layer in enumerate(sequence):
            if isinstance(layer, Conv):
                x, channels = self._conv(layer, kernels, x, channels, train, mask, axis_name)
            elif layer is relu:
                x = x if position == len(sequence) - 1 and not relu_last else relu(x)
            elif isinstance(layer, MaxPool):
                x = pooling.max_pool(x, kernels.max_pool)
                x, relu_after_pool = (relu(x) if relu_after_pool else x), False
            elif isinstance(layer, Dropout):
                x = nn.Dropout(layer.rate, deterministic=not train)(x)
            elif isinstance(layer, GlobalAvgPool):
                x = jnp.mean(x, axis=(1, 2), keepdims=True)
            elif isinstance(layer, GlobalMaxPool):
                x = jnp.max(x, axis=(1, 2), keepdims=True)
            elif isinstance(layer, Flatten):
                x = x[..., :channels].reshape(x.shape[0], -1)
                channels = x.shape[-1]
            elif isinstance(layer, Dense):
                x = nn.Dense(layer.features, dtype=self.dtype, name=layer.name)(x)
                channels = layer.features
            else:  # a block
                pooled = position + 1 < len(sequence) and isinstance(sequence[position + 1], MaxPool)
                relu_after_pool = pooled and kernels.pool_order == "pool_then_relu"
                x = layer(x, train=train, mask=mask, axis_name=axis_name, relu_last=not relu_after_pool)
                channels = x.shape[-1]
            if sow_into is not None:
                sow_into.sow("intermediates", f"{position:02d}_{layer.name}", x)
        return x[..., :channels]

    def _conv(self, spec: Conv, kernels: Kernels, x: jax.Array, channels: int, train: bool,
              mask: Optional[jax.Array], axis_name: Optional[str]) -> tuple[jax.Array, int]:
        """`spec` applied to `x`, whose first `channels` channels are its own; returns the output
        with its channels padded for the tensor cores, and how many of them are its own."""
        width = -(-spec.features // layers.TENSOR_CORE_CHANNELS) * layers.TENSOR_CORE_CHANNELS
        common = dict(use_bias=not self.batch_norm, dtype=self.dtype, kernel_init=spec.kernel_init,
                      bias_init=spec.bias_init, in_features=channels, compute_features=width, name=spec.name)
        if spec.kernel_size == 1:
            conv = layers.Conv1x1(spec.features, as_dot=kernels.conv1x1 == "dot", **common)
        else:
            conv = layers.Conv(spec.features, spec.kernel_size, spec.strides, spec.padding, **common)
        x = conv(x)
        if self.batch_norm:  # the bias would be cancelled by the normalisation's mean
            normalise = MaskedBatchNorm(momentum=0.9, dtype=self.dtype, name=f"{spec.name}_bn")
            x = layers.pad_channels(normalise(x[..., :spec.features], train, mask, axis_name), width)
        return x, spec.features
