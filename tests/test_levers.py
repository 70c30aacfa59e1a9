"""The kernel levers (nin_jax/choices.py, --cpu_kernels) change how NiN is computed, never what:
every combination gives the same parameters, loss and gradients, and `auto` picks per backend."""

import dataclasses
import itertools
from unittest import mock

import jax
import numpy as np
import optax
import pytest

from nin_jax.ops import choices
from nin_jax import steps
from nin_jax.config import Config

from test_steps import random_batch

# Xavier's class layer is not zero, so every layer gets a gradient to compare.
CONFIG = Config(resize=67, batch_size=4, weight_init="xavier", dropout_rate=0.0)
# Every pool and 1x1 form with the CPU's tuned kernels, the ReLU after the pool with the CPU's and
# the GPU's forms, then XLA's plain ops with its default choices.
COMBINATIONS = [*itertools.product(("slices", "indexed", "reduce_window"), ("dot", "conv"), ("tuned",),
                                   ("relu_then_pool",)),
                ("slices", "dot", "tuned", "pool_then_relu"), ("indexed", "conv", "tuned", "pool_then_relu"),
                ("reduce_window", "conv", "default", "relu_then_pool")]


def loss_and_grads(config: Config, params, batch):
    model = steps.create_model(config)
    images = steps.preprocess(batch["image"], config.resize)

    def loss(params):
        logits = model.apply({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    grad_fn = jax.jit(jax.value_and_grad(loss), compiler_options=choices.compiler_options(config.cpu_kernels))
    return jax.device_get(grad_fn(params))


def test_every_combination_has_the_same_parameters_loss_and_gradients():
    batch = random_batch(CONFIG.batch_size, CONFIG.batch_size)
    configs = [dataclasses.replace(CONFIG, max_pool=pool, conv1x1=conv1x1, cpu_kernels=kernels, pool_order=order)
               for pool, conv1x1, kernels, order in COMBINATIONS]
    params = [jax.device_get(steps.create_train_state(config).params) for config in configs]
    for other in params[1:]:  # checkpoints do not depend on the levers
        assert jax.tree_util.tree_structure(other) == jax.tree_util.tree_structure(params[0])
        jax.tree_util.tree_map(np.testing.assert_array_equal, other, params[0])
    reference_loss, reference_grads = loss_and_grads(configs[-1], params[0], batch)  # XLA's plain ops throughout
    assert min(np.abs(leaf).max() for leaf in jax.tree_util.tree_leaves(reference_grads)) > 0
    for config in configs[:-1]:
        loss, grads = loss_and_grads(config, params[0], batch)
        np.testing.assert_allclose(loss, reference_loss, rtol=1e-6)
        for leaf, reference in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(reference_grads)):
            np.testing.assert_allclose(leaf, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())


def primitive_counts(config: Config) -> dict[str, int]:
    """How often each lowering-relevant primitive appears in NiN's forward pass."""
    model = steps.create_model(config)
    images = jax.ShapeDtypeStruct((1, config.resize, config.resize, 1), np.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    text = str(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, images))
    return {name: text.count(f" {name}[") for name in ("conv_general_dilated", "dot_general", "reduce_window_max")}


@pytest.mark.parametrize("backend, pool, conv1x1, order", [
    ("cpu", "slices", "dot", "relu_then_pool"), ("gpu", "indexed", "conv", "pool_then_relu"),
    ("tpu", "reduce_window", "conv", "relu_then_pool"),
])
def test_auto_applies_the_levers_where_they_were_measured_and_plain_ops_elsewhere(backend, pool, conv1x1, order):
    with mock.patch.object(choices.jax, "default_backend", return_value=backend):
        assert tuple(choices.resolve(lever, "auto") for lever in ("max_pool", "conv1x1", "pool_order")) == (
            pool, conv1x1, order)
        auto = primitive_counts(CONFIG)
    assert auto == primitive_counts(dataclasses.replace(CONFIG, max_pool=pool, conv1x1=conv1x1, pool_order=order))
    # 4 blocks of one k x k and two 1x1 convolutions; 3 max-pools
    assert auto == {"conv_general_dilated": 4 if conv1x1 == "dot" else 12, "dot_general": 8 if conv1x1 == "dot" else 0,
                    "reduce_window_max": 3 if pool == "reduce_window" else 0}


def test_explicit_choices_override_auto_on_any_backend():
    with mock.patch.object(choices.jax, "default_backend", return_value="gpu"):
        assert choices.resolve("max_pool", "slices") == "slices" and choices.resolve("conv1x1", "dot") == "dot"
