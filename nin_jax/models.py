"""Network in Network (Lin, Chen & Yan, 2013) as taught in Dive into Deep Learning, in Flax linen.

Images are NHWC (the book's PyTorch code is NCHW). The layer sequence is the book's `net`:

    nin_block(96, 11, 4, 0), max-pool 3/2,
    nin_block(256, 5, 1, 2), max-pool 3/2,
    nin_block(384, 3, 1, 1), max-pool 3/2, dropout,
    nin_block(num_classes, 3, 1, 1), global average pool, flatten.

There is no fully connected layer: the last block emits one channel per class and the global
average pool turns each channel into a logit.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nin_jax import kernels

# With 11x11/4 then three 3x3/2 max-pools, 67x67 is the smallest input that leaves a 1x1 map.
MIN_INPUT_SIZE = 67

Initializer = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Init:
    """How a NiN's weights start. `kernel` initialises every convolution; the last 1x1
    convolution of the last block, whose outputs are the class scores, may start otherwise."""

    kernel: Initializer
    class_kernel: Initializer
    class_bias: Initializer


INITS = {
    # The book's `train_ch6`: Xavier-uniform kernels, zero biases. The Xavier variance shrinks the
    # signal at every block, and many of the final ReLUs start dead for every input: some seeds
    # sit at chance for hundreds of steps (docs/results.md).
    "xavier": Init(nn.initializers.xavier_uniform(), nn.initializers.xavier_uniform(), nn.initializers.zeros),
    # He-normal on fan-out (torchvision's ResNet init) keeps the signal's scale through the depth;
    # the class layer starts with zero kernels and bias 1, so every class score starts alive
    # (ReLU active) and equal, and every class gets a gradient from the first step.
    "kaiming": Init(
        nn.initializers.variance_scaling(2.0, "fan_out", "normal"), nn.initializers.zeros, nn.initializers.ones
    ),
}


# ---------------------------------------------------------------------------------------------
# Masked batch normalisation. Batch normalisation whose batch statistics are those of the batch's real examples only.
#
# Every batch has the configured size: a short last batch is padded, and its `mask` is 0 on the
# padding (`input_pipeline`). Flax's `nn.BatchNorm(mask=...)` leaves the padding out of each
# device's mean, but then averages the devices' means with equal weights, and a device whose shard
# is all padding contributes 0/0. Here every device adds up the sums and the count of its real
# examples, the sums are added over the devices (`lax.psum` over `axis_name` under pmap; under jit
# over a device mesh the batch is one global array whose sums are already global), and they are
# divided once: the statistics are exactly those of the unpadded examples, on any number of devices.
#
# The variables have Flax's names (params `scale` and `bias`, batch_stats `mean` and `var`) and the
# same update of the running averages.

def batch_statistics(x: jax.Array, mask: Optional[jax.Array] = None,
                     axis_name: Optional[str] = None) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and variance of `x` [B, ..., C] over every position of the examples whose
    `mask` [B] is 1 (all of them without a mask), across the devices of `axis_name`; float32."""
    x = x.astype(jnp.float32)
    weights = jnp.ones(x.shape[0], jnp.float32) if mask is None else mask.astype(jnp.float32)
    weights = weights.reshape((-1,) + (1,) * (x.ndim - 1))
    axes = tuple(range(x.ndim - 1))
    sums = jnp.sum(x * weights, axes), jnp.sum(jnp.square(x) * weights, axes), jnp.sum(weights) * math.prod(x.shape[1:-1])
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    total, total_of_squares, count = sums
    mean = total / count
    # E[x^2] - E[x]^2 needs one pass and one cross-device sum; rounding may take it just below 0.
    return mean, jnp.maximum(total_of_squares / count - jnp.square(mean), 0.0)


class MaskedBatchNorm(nn.Module):
    """`nn.BatchNorm` over the last axis, with batch statistics from `batch_statistics`."""

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None,
                 axis_name: Optional[str] = None) -> jax.Array:
        features = (x.shape[-1],)
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        if train:
            mean, var = batch_statistics(x, mask, axis_name)
            if not self.is_initializing():
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        else:
            mean, var = running_mean.value, running_var.value
        return ((x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias).astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# The layers. Each computes the book's layer with the parameters of flax's `nn.Conv` or `nn.Dense`
# (same names, shapes and initial values: checkpoints do not depend on how a layer is computed), in
# the form that a GPU runs fastest (docs/performance.md has the compiled programs before and after).

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
# extra ones zero, and returns its own (`NiNBlock`).
TENSOR_CORE_CHANNELS = 16


def _pad_channels(x: jax.Array, channels: int) -> jax.Array:
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
    bias = None if bias is None else _pad_channels(bias, out_channels)
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


# ---------------------------------------------------------------------------------------------
# The network.

class NiNBlock(nn.Module):
    """The book's `nin_block`: one k x k convolution, then two 1x1 convolutions, ReLU after each.

    With `last_relu=False` the caller applies the last ReLU: before a max-pool it runs after it, on
    a quarter of the elements (ReLU and max-pool commute: both are monotone)."""

    features: int
    kernel_size: int
    strides: int
    padding: int
    dtype: Any = jnp.float32
    kernel_init: Initializer = INITS["xavier"].kernel
    last_kernel_init: Initializer = INITS["xavier"].kernel
    last_bias_init: Initializer = nn.initializers.zeros
    batch_norm: bool = False
    conv1x1: str = "auto"  # see nin_jax/kernels.py
    last_relu: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None,
                 axis_name: Optional[str] = None) -> jax.Array:
        width = -(-self.features // TENSOR_CORE_CHANNELS) * TENSOR_CORE_CHANNELS
        conv1x1 = functools.partial(Conv1x1, as_dot=kernels.resolve("conv1x1", self.conv1x1) == "dot",
                                    in_features=self.features)
        conv = functools.partial(Conv, kernel_size=self.kernel_size, strides=self.strides, padding=self.padding)
        layers = (
            ("conv", conv, self.kernel_init, nn.initializers.zeros),
            ("conv1x1_1", conv1x1, self.kernel_init, nn.initializers.zeros),
            ("conv1x1_2", conv1x1, self.last_kernel_init, self.last_bias_init),
        )
        for position, (name, layer, kernel_init, bias_init) in enumerate(layers):
            if self.batch_norm:  # the bias would be cancelled by the normalisation's mean
                x = layer(self.features, dtype=self.dtype, kernel_init=kernel_init, use_bias=False,
                          compute_features=width, name=name)(x)
                bn = MaskedBatchNorm(momentum=0.9, dtype=self.dtype, name=f"{name}_bn")
                x = _pad_channels(bn(x[..., :self.features], train, mask, axis_name), width)
            else:
                x = layer(self.features, dtype=self.dtype, kernel_init=kernel_init, bias_init=bias_init,
                          compute_features=width, name=name)(x)
            if position < len(layers) - 1 or self.last_relu:
                x = relu(x)
        return x[..., :self.features]


def max_pool(x: jax.Array, choice: str = "auto") -> jax.Array:
    """The book's `nn.MaxPool2d(3, stride=2)`: 3x3 window, stride 2, no padding, computed as
    `choice` says (nin_jax/kernels.py)."""
    form = kernels.resolve("max_pool", choice)
    if form == "slices":
        return kernels.max_pool(x, 3, 2)
    if form == "indexed":
        return kernels.max_pool_indexed(x, 3, 2)
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


def check_images(x: jax.Array, in_channels: int) -> None:
    """Raises a ValueError that says what is wrong with a batch of model inputs."""
    if x.ndim != 4:
        raise ValueError(f"NiN expects a batch of NHWC images of rank 4, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"NiN expects floating-point images scaled to [0, 1], got dtype {x.dtype}")
    if x.shape[-1] != in_channels:
        raise ValueError(f"NiN expects {in_channels} channel(s) in the last axis (NHWC), got shape {tuple(x.shape)}")
    height, width = x.shape[1:3]
    if min(height, width) < MIN_INPUT_SIZE:
        raise ValueError(
            f"NiN needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} "
            f"(its stride-4 stem and three 3/2 max-pools shrink them to nothing), got {height}x{width}"
        )


class NiN(nn.Module):
    """The book's NiN. Logits come out as float32 whatever the compute `dtype`.

    Every layer's output is sown into the 'intermediates' collection as `<position>_<layer>`
    (e.g. `01_pool1`), so `layer_summary` can list the shapes in order without a second copy of
    the architecture. With `pool_order` pool_then_relu, blocks 1 to 3 are sown before their last
    ReLU, which runs after the pool.
    """

    num_classes: int = 10
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    in_channels: int = 1
    weight_init: str = "kaiming"  # a key of INITS
    batch_norm: bool = False  # batch normalisation after every convolution: a variant, not the book's NiN
    max_pool: str = "auto"  # how the kernels compute the same function: see nin_jax/kernels.py
    conv1x1: str = "auto"
    pool_order: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None,
                 axis_name: Optional[str] = None) -> jax.Array:
        """With batch norm in training, `mask` [B] (0 on padding) and the pmap `axis_name` make its
        statistics those of the real examples of the whole batch (see `batch_norm`)."""
        check_images(x, self.in_channels)
        init = INITS[self.weight_init]

        relu_after_pool = kernels.resolve("pool_order", self.pool_order) == "pool_then_relu"

        def block(name, features, kernel_size, strides, padding, classes=False):
            # Under batch norm a zero class kernel would normalise to zero, where ReLU passes no gradient.
            special = classes and not self.batch_norm
            last_kernel, last_bias = (init.class_kernel, init.class_bias) if special else (init.kernel, nn.initializers.zeros)
            # Every block but the class block is followed by a max-pool, which may run its last ReLU (`pool`).
            module = NiNBlock(features, kernel_size, strides, padding, self.dtype, init.kernel, last_kernel, last_bias,
                              self.batch_norm, self.conv1x1, last_relu=classes or not relu_after_pool, name=name)
            return functools.partial(module, train=train, mask=mask, axis_name=axis_name)

        def pool(y):
            """The book's max-pool after a block, with that block's last ReLU after it where
            `pool_order` says: the same values."""
            y = max_pool(y, self.max_pool)
            return relu(y) if relu_after_pool else y

        layers = (
            ("block1", block("block1", 96, 11, 4, 0)),
            ("pool1", pool),
            ("block2", block("block2", 256, 5, 1, 2)),
            ("pool2", pool),
            ("block3", block("block3", 384, 3, 1, 1)),
            ("pool3", pool),
            ("dropout", nn.Dropout(self.dropout_rate, deterministic=not train)),
            ("block4", block("block4", self.num_classes, 3, 1, 1, classes=True)),
            ("global_avg_pool", lambda y: jnp.mean(y, axis=(1, 2), keepdims=True)),
            ("flatten", lambda y: y.reshape(y.shape[0], -1)),
        )
        for position, (name, layer) in enumerate(layers):
            x = layer(x)
            self.sow("intermediates", f"{position:02d}_{name}", x)
        return x.astype(jnp.float32)


def layer_summary(model: NiN, image_size: int, batch_size: int = 1) -> list[tuple[str, tuple[int, ...], int]]:
    """(layer name, output shape, parameter count) per layer, traced abstractly (nothing is run)."""
    images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, model.in_channels), jnp.float32)

    def init_and_apply(x):
        variables = model.init(jax.random.key(0), x)
        _, state = model.apply(variables, x, mutable=["intermediates"])
        return variables["params"], state["intermediates"]

    params, intermediates = jax.eval_shape(init_and_apply, images)
    rows = []
    for key, (shape_struct,) in sorted(intermediates.items()):
        name = key.split("_", 1)[1]
        count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params.get(name, {})))
        rows.append((name, tuple(shape_struct.shape), count))
    return rows


def format_summary(rows: list[tuple[str, tuple[int, ...], int]]) -> str:
    """The book's shape printout, one line per layer, with parameter counts and their total."""
    lines = [f"{'layer':<16} {'output shape (NHWC)':<22} {'params':>10}"]
    for name, shape, count in rows:
        lines.append(f"{name:<16} {str(shape):<22} {count:>10,}")
    lines.append(f"{'total':<16} {'':<22} {sum(count for _, _, count in rows):>10,}")
    return "\n".join(lines)


def param_count(params) -> int:
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
