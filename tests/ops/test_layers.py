"""The layers that NiN names (nin_jax/ops/layers.py): each draws the parameters of the flax layer
it stands for and computes what that layer computes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nin_jax.ops import layers


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
