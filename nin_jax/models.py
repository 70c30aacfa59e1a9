"""Network in Network (Lin, Chen & Yan, 2013) as taught in Dive into Deep Learning, in Flax linen.

Images are NHWC (the book's PyTorch code is NCHW). The layer sequence is the book's `net`:

    nin_block(96, 11, 4, 0), max-pool 3/2,
    nin_block(256, 5, 1, 2), max-pool 3/2,
    nin_block(384, 3, 1, 1), max-pool 3/2, dropout,
    nin_block(num_classes, 3, 1, 1), global average pool, flatten.

There is no fully connected layer: the last block emits one channel per class and the global
average pool turns each channel into a logit, its mean (not its maximum): each channel is a map of
where the network found its class. `Variant` holds the chapter's exercises, the book's NiN by default.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nin_jax import ops

# With 11x11/4 then three 3x3/2 max-pools, 67x67 is the smallest input that leaves a 1x1 map.
MIN_INPUT_SIZE = 67

Initializer = Callable[..., jax.Array]
zeros = nn.initializers.zeros


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
    "xavier": Init(nn.initializers.xavier_uniform(), nn.initializers.xavier_uniform(), zeros),
    # He-normal on fan-out (torchvision's ResNet init) keeps the signal's scale through the depth;
    # the class layer starts with zero kernels and bias 1, so every class score starts alive
    # (ReLU active) and equal, and every class gets a gradient from the first step.
    "kaiming": Init(
        nn.initializers.variance_scaling(2.0, "fan_out", "normal"), nn.initializers.zeros, nn.initializers.ones
    ),
}


HEADS = ("avg", "max", "dense")  # what turns each class map into its class's score: the book's is "avg"


@dataclasses.dataclass(frozen=True)
class Variant:
    """The chapter's exercises as options of the one model, each at the book's NiN by default
    (docs/exercises.md trains and measures them)."""

    inner_convs: int = 2  # the convolutions after each block's first: the book's two
    inner_kernel_size: int = 1  # their kernel, padded to keep the map's size: the book's 1x1
    class_width: int = 0  # of the last block's first two convolutions; 0: the classes', the book's 384 to 10 at once
    head: str = "avg"  # of HEADS: each map's mean (the book's), its maximum, or a dense layer on the flattened maps

    def inner_layers(self, features: int, out_features: int, kernel: Initializer, last_kernel: Initializer,
                     last_bias: Initializer) -> list:
        """A block's convolutions after its first, each with its ReLU: the book's conv1x1_1, relu,
        conv1x1_2, relu. Their names stay the book's whatever their kernel, as the parameters do."""
        size, layers = self.inner_kernel_size, []
        for number in range(1, self.inner_convs + 1):
            last = number == self.inner_convs
            layers += [ops.Conv(out_features if last else features, size, 1, size // 2, last_kernel if last else kernel,
                                last_bias if last else zeros, name=f"conv1x1_{number}"), ops.relu]
        return layers

    def head_layers(self, num_classes: int) -> list:
        """The layers after the last block, which turn its class maps into the class scores."""
        return {"avg": [ops.GlobalAvgPool(), ops.Flatten()],  # one score per class map, the book's
                "max": [ops.GlobalMaxPool(), ops.Flatten()],
                "dense": [ops.Flatten(), ops.Dense(num_classes, name="dense")]}[self.head]


class NiNBlock(nn.Module):
    """The book's `nin_block`: a k x k convolution, then two 1x1 convolutions, each followed by a ReLU
    (an exercise's `variant` changes the two). `layers` computes them (nin_jax/ops): how, never what."""

    features: int
    kernel_size: int
    strides: int
    padding: int
    init: Init = INITS["kaiming"]  # the package's; INITS["xavier"] is the book's
    class_scores: bool = False  # the last block: its last convolution starts as init.class_kernel and class_bias
    layers: ops.Layers = ops.Layers()
    variant: Variant = Variant()  # the book's
    out_features: int = 0  # of the last convolution, where an exercise widens the others; 0: `features`

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, **context) -> jax.Array:
        """`context`: batch norm's `mask` and `axis_name`, and `relu_last` (see `ops.Layers.run`)."""
        kernel = self.init.kernel
        last_kernel, last_bias = (self.init.class_kernel, self.init.class_bias) if self.class_scores else (kernel, zeros)
        return self.layers.run(x, [
            ops.Conv(self.features, self.kernel_size, self.strides, self.padding, kernel, name="conv"),
            ops.relu,
            *self.variant.inner_layers(self.features, self.out_features or self.features, kernel, last_kernel,
                                       last_bias),  # the book's conv1x1_1, relu, conv1x1_2, relu
        ], train=train, **context)


class NiN(nn.Module):
    """The book's NiN, whose logits come out as float32 whatever the compute `dtype`. With
    `batch_norm` (the strong recipe's variant, not the book's) each convolution is normalised before
    its ReLU; in training, `mask` [B] (0 on a padded batch's padding) and the pmap `axis_name` make
    the statistics those of the real examples of the whole batch. Each layer's output is sown into
    'intermediates' as `<position>_<layer>` (e.g. `07_block4`, the class maps), for `layer_summary`."""

    num_classes: int = 10
    dropout_rate: float = 0.5
    weight_init: str = "kaiming"  # a key of INITS
    batch_norm: bool = False
    dtype: Any = jnp.float32
    kernels: ops.Kernels = ops.Kernels()  # which kernels compute the layers: see nin_jax/ops/choices.py
    in_channels: int = 1
    variant: Variant = Variant()  # the book's; the chapter's exercises change it

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None,
                 axis_name: Optional[str] = None) -> jax.Array:
        check_images(x, self.in_channels)
        layers = ops.Layers(self.dtype, self.batch_norm, self.kernels)
        block = functools.partial(NiNBlock, init=INITS[self.weight_init], layers=layers, variant=self.variant)
        return layers.run(x, [
            block(96, 11, 4, 0, name="block1"), ops.MaxPool(name="pool1"),
            block(256, 5, 1, 2, name="block2"), ops.MaxPool(name="pool2"),
            block(384, 3, 1, 1, name="block3"), ops.MaxPool(name="pool3"),
            ops.Dropout(self.dropout_rate),
            # Under batch norm a zero class kernel would normalise to zero, where ReLU passes no gradient.
            block(self.variant.class_width or self.num_classes, 3, 1, 1, out_features=self.num_classes,
                  class_scores=not self.batch_norm, name="block4"),
            *self.variant.head_layers(self.num_classes),  # the book's: global average pool, flatten; no dense layer
        ], train=train, mask=mask, axis_name=axis_name, sow_into=self).astype(jnp.float32)


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
