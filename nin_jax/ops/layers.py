"""NiN's convolutions and ReLU in the forms a GPU runs fastest.

Each computes the book's layer with the parameters of Flax's `nn.Conv` or `nn.Dense` (same names,
shapes and initial values: checkpoints do not depend on how a layer is computed); docs/performance.md
has the programs compiled for a GPU before and after each form.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


@jax.custom_jvp
def relu(x: jax.Array) -> jax.Array:
    """`nn.relu`, whose gradient reads its output instead of its input: the same mask (y > 0 where
    x > 0), but the backward pass no longer needs the value before the ReLU, so XLA fuses the bias
    and the ReLU into the convolution before it (cuDNN's conv-bias-activation) and never keeps it.
    The barrier keeps XLA from simplifying max(x, 0) > 0 back into x > 0."""
    return jnp.maximum(x, 0)


relu.defjvps(lambda tangent, y, x: jnp.where(jax.lax.optimization_barrier(y) > 0, tangent, jnp.zeros_like(tangent)))

# Tensor cores take channels in multiples of 8; cuDNN lays a map of fewer (the class block's 10) out
# as NCHW and transposes it around every call. Such a block computes a multiple of 16 channels, the
# extra ones zero, and returns its own (`sequential.Layers`).
TENSOR_CORE_CHANNELS = 16


def pad_channels(x: jax.Array, channels: int) -> jax.Array:
    """x with zero channels added up to `channels`."""
    return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, channels - x.shape[-1]),))


def _parameters(layer: nn.Module, x: jax.Array, window: tuple[int, ...]):
    """The kernel [*window, in, out] and bias of `layer` (a `Conv` or `Conv1x1`), created with the
    layer's own channels, and returned with the input in the compute dtype, the kernel and bias
    padded with zeros to the channels computed: x's own, and `compute_features`."""
    shape = (*window, layer.in_features or x.shape[-1], layer.features)
    kernel = layer.param("kernel", layer.kernel_init, shape, jnp.float32)
    bias = layer.param("bias", layer.bias_init, (layer.features,), jnp.float32) if layer.use_bias else None
    out_channels = layer.compute_features or layer.features
    kernel = jnp.pad(kernel, ((0, 0),) * len(window) + ((0, x.shape[-1] - shape[-2]), (0, out_channels - shape[-1])))
    bias = None if bias is None else pad_channels(bias, out_channels)
    return nn.dtypes.promote_dtype(x, kernel, bias, dtype=layer.dtype)


def space_to_depth(x: jax.Array, block: int) -> jax.Array:
    """[B, H, W, C] -> [B, H/block, W/block, block*block*C]: each block x block patch becomes the
    channels of one pixel, in row-major order."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // block, block, width // block, block, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height // block, width // block, block * block * channels)


def strided_conv_as_space_to_depth(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """The VALID convolution of NHWC `x` with an HWIO `kernel` at `stride`, computed at stride 1
    over `x` folded stride x stride into channels, with the kernel zero-padded to a multiple of
    the stride and folded alike: output[i, j] = sum over (a, c) of x[s*i + a, s*j + c] * kernel[a, c]
    either way. The stem's 11x11/4 convolution of one channel gives the tensor cores nothing to
    multiply; folded, it is a 3x3 convolution over 16 channels (ResNet's stem on TPUs)."""
    size = kernel.shape[0]
    blocks = -(-size // stride)  # the kernel's size in folded pixels
    out_h, out_w = ((n - size) // stride + 1 for n in x.shape[1:3])
    # The image cut or zero-padded to the whole blocks that the windows touch; the padding only ever
    # meets the kernel's zero padding.
    height, width = stride * (out_h + blocks - 1), stride * (out_w + blocks - 1)
    x = x[:, :height, :width]
    x = jnp.pad(x, ((0, 0), (0, height - x.shape[1]), (0, width - x.shape[2]), (0, 0)))
    kernel = jnp.pad(kernel, ((0, stride * blocks - size),) * 2 + ((0, 0),) * 2)
    kernel = kernel.reshape(blocks, stride, blocks, stride, *kernel.shape[2:]).transpose(0, 2, 1, 3, 4, 5)
    return jax.lax.conv_general_dilated(space_to_depth(x, stride), kernel.reshape(blocks, blocks, -1, kernel.shape[-1]),
                                        (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nn.Module):
    """A k x k convolution over NHWC with `nn.Conv`'s parameters, a strided one computed as
    `strided_conv_as_space_to_depth`. `in_features` are the input's own channels where it carries
    zero channels beyond them; `compute_features` (default `features`) the channels computed."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    in_features: Optional[int] = None
    compute_features: Optional[int] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = _parameters(self, x, (self.kernel_size, self.kernel_size))
        pads = ((self.padding, self.padding),) * 2
        if self.strides > 1:
            y = strided_conv_as_space_to_depth(jnp.pad(x, ((0, 0), *pads, (0, 0))), kernel, self.strides)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if bias is None else y + bias


class Conv1x1(nn.Module):
    """A 1x1 convolution over NHWC: a dense layer applied to every pixel's channel vector.

    Its parameters are `nn.Dense`'s (an (inputs, outputs) kernel, drawn the same way), whether it
    is computed as a dot over channels (`as_dot`, whose weight gradient XLA computes faster on the
    CPU: benchmarks/conv_levers.py --layers conv1x1) or as a convolution with that kernel.
    `in_features` and `compute_features` as for `Conv`.
    """

    features: int
    as_dot: bool
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    in_features: Optional[int] = None
    compute_features: Optional[int] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = _parameters(self, x, ())
        if self.as_dot:
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        else:
            y = jax.lax.conv_general_dilated(x, kernel[None, None], (1, 1), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if bias is None else y + bias
