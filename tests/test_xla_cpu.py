"""--cpu_kernels: which kernels XLA's CPU backend compiles the steps with, and that the function stays the same."""

import re

import jax
import numpy as np
import pytest

from nin_jax.ops import choices
from nin_jax.runtime import parallel
from nin_jax import steps
from nin_jax.config import Config

from conftest import one_train_step, make_strategy
from test_steps import random_batch

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
