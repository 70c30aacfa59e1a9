"""Shapes, parameter count and input checks of the NiN model."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.plain_flax import PlainNiN
from nin_jax import models, ops
from nin_jax.ops import layers

from conftest import float64

# The book's PyTorch printout on a 1x224x224 image (NCHW), transposed to NHWC.
REFERENCE_SHAPES_224 = [
    ("block1", (1, 54, 54, 96)),
    ("pool1", (1, 26, 26, 96)),
    ("block2", (1, 26, 26, 256)),
    ("pool2", (1, 12, 12, 256)),
    ("block3", (1, 12, 12, 384)),
    ("pool3", (1, 5, 5, 384)),
    ("dropout", (1, 5, 5, 384)),
    ("block4", (1, 5, 5, 10)),
    ("global_avg_pool", (1, 1, 1, 10)),
    ("flatten", (1, 10)),
]
REFERENCE_PARAMS = 1_992_166


def test_layer_shapes_at_224_match_the_book():
    rows = models.layer_summary(models.NiN(), 224)
    assert [(name, shape) for name, shape, _ in rows] == REFERENCE_SHAPES_224


def test_parameter_count_matches_the_book():
    rows = models.layer_summary(models.NiN(), 224)
    assert sum(count for _, _, count in rows) == REFERENCE_PARAMS
    params = jax.eval_shape(models.NiN().init, jax.random.key(0), jnp.zeros((1, 224, 224, 1)))["params"]
    assert models.param_count(params) == REFERENCE_PARAMS


def test_summary_text_lists_every_layer_and_the_total():
    text = models.format_summary(models.layer_summary(models.NiN(), 224))
    for name, shape in REFERENCE_SHAPES_224:
        assert name in text and str(shape) in text
    assert "1,992,166" in text


@pytest.mark.parametrize("batch_size, size", [(1, 224), (3, 96), (8, 67), (2, 100)])
def test_output_is_batch_by_classes(batch_size, size):
    model = models.NiN(num_classes=10)
    images = jax.ShapeDtypeStruct((batch_size, size, size, 1), jnp.float32)
    logits = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], images)
    chex.assert_shape(logits, (batch_size, 10))
    chex.assert_type(logits, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_pass_runs_and_returns_float32_logits(dtype):
    model = models.NiN(num_classes=7, dtype=dtype)
    images = jax.random.uniform(jax.random.key(1), (2, 67, 67, 1))
    variables = model.init(jax.random.key(0), images)
    logits = model.apply(variables, images)
    chex.assert_shape(logits, (2, 7))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    chex.assert_type(jax.tree_util.tree_leaves(variables)[0], jnp.float32)  # parameters stay float32


def test_dropout_only_in_training():
    model = models.NiN(dropout_rate=0.5)
    images = jax.random.uniform(jax.random.key(1), (2, 67, 67, 1))
    variables = model.init(jax.random.key(0), images)
    # Large biases make the last block's inputs matter, so dropping them changes the output.
    variables = jax.tree_util.tree_map(lambda p: p + 0.1, variables)
    eval_a, eval_b = (model.apply(variables, images) for _ in range(2))
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, train_b = (
        model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(k)}) for k in (1, 2)
    )
    assert not np.allclose(train_a, eval_a)
    assert not np.allclose(train_a, train_b)


def test_global_average_pool_is_a_mean_over_the_whole_map():
    model = models.NiN()
    images = jax.random.uniform(jax.random.key(1), (1, 120, 120, 1))
    variables = model.init(jax.random.key(0), images)
    logits, state = model.apply(variables, images, mutable=["intermediates"])
    (block4,) = state["intermediates"]["07_block4"]
    assert block4.shape[1:3] == (2, 2)  # a 5x5 window, as in the book's JAX code, would not fit
    np.testing.assert_allclose(logits, block4.mean(axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize("as_dot", [True, False])
def test_a_1x1_layer_has_dense_parameters_and_computes_a_1x1_convolution(as_dot):
    """Conv1x1's parameters are nn.Dense's, drawn the same way, whichever way it is computed, and
    it computes nn.Conv's 1x1 map with those weights."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 16))
    params = layers.Conv1x1(8, as_dot).init(jax.random.key(1), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, nn.Dense(8).init(jax.random.key(1), x))
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # a nonzero bias
    conv_params = {"params": {"kernel": params["params"]["kernel"][None, None], "bias": params["params"]["bias"]}}
    np.testing.assert_allclose(layers.Conv1x1(8, as_dot).apply(params, x), nn.Conv(8, (1, 1)).apply(conv_params, x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        ((1, 66, 66, 1), jnp.float32, "at least 67x67"),
        ((1, 224, 50, 1), jnp.float32, "at least 67x67"),
        ((224, 224, 1), jnp.float32, "rank 4"),
        ((1, 1, 224, 224), jnp.float32, "1 channel"),
        ((1, 96, 96, 3), jnp.float32, "1 channel"),
        ((1, 96, 96, 1), jnp.uint8, "floating-point"),
    ],
)
def test_bad_inputs_fail_with_a_clear_error(shape, dtype, message):
    model = models.NiN()
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, dtype))


@pytest.mark.parametrize("weight_init", sorted(models.INITS))
def test_every_class_score_can_learn_from_the_first_step(weight_init):
    """With 'kaiming' no class starts dead (its ReLU off for every image); with the book's 'xavier'
    some do, which is why the book's recipe can sit at chance."""
    images = jax.random.uniform(jax.random.key(1), (64, 96, 96, 1))
    model = models.NiN(weight_init=weight_init)
    variables = model.init(jax.random.key(0), images)
    logits = model.apply(variables, images)
    dead_classes = int((logits.max(axis=0) == 0).sum())
    if weight_init == "kaiming":
        assert dead_classes == 0
        np.testing.assert_allclose(logits, 1.0)  # zero class kernels, bias 1: equal, alive scores
    else:
        assert dead_classes > 0


def as_conv_variables(variables):
    """models.NiN's variables under PlainNiN's names, 1x1 kernels reshaped to [1, 1, in, out]."""
    return {
        collection: {
            f"{block}/{layer}": {name: value.reshape((1, 1) + value.shape) if name == "kernel" and value.ndim == 2
                                 else value for name, value in leaves.items()}
            for block, layers in tree.items() for layer, leaves in layers.items()
        }
        for collection, tree in variables.items()
    }


@pytest.mark.parametrize("max_pool, conv1x1, pool_order, size, batch_norm", [
    ("slices", "dot", "relu_then_pool", 67, False),  # the CPU's levers, at the smallest size
    ("indexed", "conv", "pool_then_relu", 75, False),  # the GPU's; sizes not multiples of the stem's stride
    ("reduce_window", "conv", "pool_then_relu", 98, False),
    ("indexed", "dot", "pool_then_relu", 71, True),  # the strong recipe's batch norm
])
def test_the_fast_model_computes_the_straightforward_convolutional_nin(max_pool, conv1x1, pool_order, size,
                                                                        batch_norm):
    """Same weights, same outputs and same gradients as plain nn.Conv layers, nn.relu and
    nn.max_pool in the book's order (tests/test_levers.py checks every lever in float32), on a
    padded batch: the stem as space-to-depth, the ReLUs after the pools and with their gradient
    from their outputs, the class block on 16 channels, each pool's gradient. In float64, where
    the two agree to 1e-15, so that rounding cannot hide a difference: in float32 batch norm over
    three examples magnifies the rounding of the two orders of summation to 1e-4."""
    with float64():
        images = jax.random.uniform(jax.random.key(1), (5, size, size, 1), jnp.float64)
        mask = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0], jnp.float64)  # a last batch of 3, padded to 5
        model = models.NiN(kernels=ops.Kernels(max_pool, conv1x1, pool_order), batch_norm=batch_norm,
                           dropout_rate=0.0, dtype=jnp.float64)
        variables = model.init(jax.random.key(0), images)
        keys = iter(jax.random.split(jax.random.key(2), 100))
        # Every parameter nonzero (the default class layer starts at zero), so every gradient path is live.
        params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape, jnp.float64),
                                        variables["params"])
        stats = variables.get("batch_stats", {})
        cotangent = (jax.random.normal(jax.random.key(3), (5, 10)) * mask[:, None]).astype(jnp.float32)

        def fast(params):
            logits, _ = model.apply({"params": params, "batch_stats": stats}, images, train=batch_norm, mask=mask,
                                    mutable=["batch_stats"])
            return logits

        def straightforward(params):
            converted = as_conv_variables({"params": params, "batch_stats": stats})
            logits, _ = PlainNiN(batch_norm, jnp.float64).apply(converted, images, mask, mutable=["batch_stats"])
            return logits

        # Compiled, where op by op the pools' many small operations cost more time than the arithmetic;
        # with batch norm op by op, so that its float32 statistics are rounded alike in both.
        compile = (lambda f: f) if batch_norm else jax.jit
        logits, fast_vjp = jax.vjp(compile(fast), params)
        expected, straightforward_vjp = jax.vjp(compile(straightforward), params)
        grads, expected_grads = fast_vjp(cotangent)[0], straightforward_vjp(cotangent)[0]
    assert jax.tree_util.tree_map(lambda leaf: leaf.dtype, grads) == jax.tree_util.tree_map(lambda leaf: leaf.dtype,
                                                                                             params)
    assert np.abs(expected[:3]).max() > 0
    np.testing.assert_allclose(logits[:3], expected[:3], rtol=1e-6)
    for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
        expected_grad = functools.reduce(lambda tree, key: tree[key.key], path, expected_grads)
        assert np.abs(expected_grad).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-12 * np.abs(expected_grad).max(),
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kernel_size, strides, padding, size", [(11, 4, 0, 224), (11, 4, 0, 70), (3, 2, 1, 9),
                                                                 (4, 2, 0, 10), (5, 3, 2, 16)])
def test_a_strided_convolution_is_nn_conv_with_its_parameters(kernel_size, strides, padding, size):
    """`models.Conv` draws nn.Conv's parameters, and computes a strided convolution as a stride-1
    one over the image folded into channels: the same values."""
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    conv = layers.Conv(8, kernel_size, strides, padding)
    reference = nn.Conv(8, (kernel_size,) * 2, (strides,) * 2, ((padding, padding),) * 2)
    params = conv.init(jax.random.key(1), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, reference.init(jax.random.key(1), x))
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # a nonzero bias
    np.testing.assert_allclose(conv.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", ["conv", "conv1x1"])
def test_a_layer_computed_on_more_channels_returns_zeros_on_them(layer):
    """The class block's 16 computed channels: its own 10, then zeros, from inputs that carry zero
    channels beyond their own; the parameters have the layer's own shapes."""
    x = layers.pad_channels(jax.random.normal(jax.random.key(0), (2, 7, 7, 10)), 16)
    module = (layers.Conv(10, 3, padding=1, in_features=10, compute_features=16) if layer == "conv" else
              layers.Conv1x1(10, as_dot=True, in_features=10, compute_features=16))
    plain = layers.Conv(10, 3, padding=1) if layer == "conv" else layers.Conv1x1(10, as_dot=True)
    params = jax.tree_util.tree_map(lambda p: p + 0.1, module.init(jax.random.key(1), x))
    assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(np.shape, plain.init(jax.random.key(1), x[..., :10]))
    y = module.apply(params, x)
    assert y.shape == (2, 7, 7, 16) and not np.any(y[..., 10:])
    np.testing.assert_allclose(y[..., :10], plain.apply(params, x[..., :10]), rtol=1e-6, atol=1e-6)


def test_relu_has_nn_relu_values_and_gradients_at_zero_too():
    x = jnp.array([-2.0, -0.0, 0.0, 1e-30, 3.0])
    np.testing.assert_array_equal(layers.relu(x), nn.relu(x))
    np.testing.assert_array_equal(jax.grad(lambda x: layers.relu(x).sum())(x), jax.grad(lambda x: nn.relu(x).sum())(x))
