"""The kernel levers (nin_jax/ops/choices.py) change how NiN is computed, never what: every
combination gives the same parameters, loss and gradients, and `auto` picks per backend; and
--cpu_kernels, which kernels XLA's CPU backend compiles the steps with, keeps the function the same."""

import dataclasses
import itertools
import re
from unittest import mock

import jax
import numpy as np
import optax
import pytest

from nin_jax.ops import choices
from nin_jax import steps
from nin_jax.config import Config

from conftest import make_strategy, one_train_step, random_batch

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


# jaxlib 0.10's XLA has the option; older ones do not, and `--cpu_kernels tuned` then compiles with
# XLA's defaults (the next-but-one test).
needs_the_option = pytest.mark.skipif(choices.compiler_options("tuned") is None,
                                      reason="this jaxlib's XLA has no YNNPACK reduce fusions to ask for")


@needs_the_option
def test_tuned_asks_for_the_option_and_default_for_nothing():
    assert jax.default_backend() == "cpu"
    assert choices.compiler_options("tuned") == choices.TUNED_OPTIONS
    assert choices.compiler_options("default") is None


def test_an_xla_without_the_option_compiles_with_its_defaults(monkeypatch):
    monkeypatch.setattr(choices, "TUNED_OPTIONS", {"xla_cpu_no_such_option": "x"})
    choices._xla_knows_tuned_options.cache_clear()
    try:
        assert choices.compiler_options("tuned") is None
        config = Config(resize=67, batch_size=4, parallel="jit")
        strategy = make_strategy("jit", config)
        state = strategy.put_state(steps.create_train_state(config))
        _, metrics = one_train_step(strategy, state, random_batch(4, 4))
        assert np.isfinite(metrics["loss_sum"])
    finally:
        choices._xla_knows_tuned_options.cache_clear()


def library_fused_ops(hlo_text: str) -> set[str]:
    """The HLO opcodes XLA handed to YNNPACK: those inside the computations its fusions call."""
    called = set(re.findall(r'calls=(%[\w.-]+).*"kind":"__ynn_fusion"', hlo_text))
    ops = set()
    for body in re.split(r"\n(?=%)", hlo_text):
        if body.split(" ", 1)[0] in called:
            ops |= set(re.findall(r"= \S+ (\w[\w-]*)\(", body))
    return ops


@pytest.fixture(scope="module")
def compiled_steps():
    """One training step from the same state and batch, compiled both ways."""
    batch = random_batch(8, 8)
    result = {}
    for cpu_kernels in ("tuned", "default"):
        config = Config(resize=67, batch_size=8, parallel="jit", cpu_kernels=cpu_kernels)
        strategy = make_strategy("jit", config)
        state = strategy.put_state(steps.create_train_state(config))
        strategy.compile(state, batch)
        text = strategy._train.as_text()
        new_state, metrics = one_train_step(strategy, state, batch)
        result[cpu_kernels] = (text, jax.device_get(new_state.params), jax.device_get(metrics))
    return result


@needs_the_option
def test_tuned_steps_leave_convolutions_and_dots_to_xla_and_reductions_to_ynnpack(compiled_steps):
    tuned, default = library_fused_ops(compiled_steps["tuned"][0]), library_fused_ops(compiled_steps["default"][0])
    assert "reduce" in tuned and not {"convolution", "dot"} & tuned
    assert "convolution" in default  # jaxlib 0.10's own choice, which the option overrides


def test_the_kernels_compute_the_same_training_step(compiled_steps):
    (_, tuned_params, tuned_metrics), (_, default_params, default_metrics) = (
        compiled_steps["tuned"], compiled_steps["default"])
    np.testing.assert_allclose(tuned_metrics["loss_sum"], default_metrics["loss_sum"], rtol=1e-5)
    for tuned, default in zip(jax.tree_util.tree_leaves(tuned_params), jax.tree_util.tree_leaves(default_params)):
        np.testing.assert_allclose(tuned, default, rtol=1e-4, atol=1e-6)
