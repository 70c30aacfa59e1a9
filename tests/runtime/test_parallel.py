"""The strategies of nin_jax/runtime/parallel.py: pmap and sharding give jit's steps on 2 and 4
fake CPU devices, `auto` picks among them, and the state goes to the devices and back."""

import dataclasses
from unittest import mock

import jax
import numpy as np
import pytest

from nin_jax import steps
from nin_jax.config import ConfigError

from conftest import STEP_CONFIG, make_strategy, one_train_step, random_batch


def one_step(strategy, batch):
    state = strategy.put_state(steps.create_train_state(STEP_CONFIG))
    state, metrics = one_train_step(strategy, state, batch)
    return strategy.get_state(state), jax.device_get(metrics)


@pytest.mark.parametrize("num_devices", [2, 4])
@pytest.mark.parametrize("num_real", [16, 13])
def test_pmap_step_equals_jit_step(num_devices, num_real):
    """One pmap step over a global batch gives the jit step's parameters, padded batches included."""
    batch = random_batch(STEP_CONFIG.batch_size, num_real)
    jit_state, jit_metrics = one_step(make_strategy("jit", STEP_CONFIG), batch)
    pmap_state, pmap_metrics = one_step(make_strategy("pmap", STEP_CONFIG, jax.local_devices()[:num_devices]), batch)
    assert int(pmap_state.step) == int(jit_state.step) == 1
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), pmap_state.params, jit_state.params
    )
    assert pmap_metrics["count"] == jit_metrics["count"] == num_real
    assert pmap_metrics["loss_sum"].shape == ()  # summed over devices in the step: one value, not one per device
    np.testing.assert_allclose(pmap_metrics["loss_sum"], jit_metrics["loss_sum"], rtol=1e-5)
    assert pmap_metrics["correct"] == jit_metrics["correct"]


def test_sharding_step_equals_pmap_step_over_a_few_steps():
    """`--parallel sharding` (jit over a mesh) and `--parallel pmap` agree step after step."""
    batches = [random_batch(STEP_CONFIG.batch_size, num_real, seed) for seed, num_real in enumerate((16, 16, 9))]
    results = []
    for strategy in (make_strategy("pmap", STEP_CONFIG), make_strategy("sharding", STEP_CONFIG)):
        assert strategy.num_devices == 4
        state = strategy.put_state(steps.create_train_state(STEP_CONFIG))
        for batch in batches:
            state, metrics = one_train_step(strategy, state, batch)
        results.append((strategy.get_state(state).params, jax.device_get(metrics)))
    (pmap_params, pmap_metrics), (sharded_params, sharded_metrics) = results
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), pmap_params, sharded_params)
    assert pmap_metrics["count"] == sharded_metrics["count"] == 9
    np.testing.assert_allclose(pmap_metrics["loss_sum"], sharded_metrics["loss_sum"], rtol=1e-5)


def test_pmap_refuses_a_batch_that_does_not_split_over_the_devices():
    with pytest.raises(ConfigError, match="does not split evenly over 4 devices"):
        make_strategy("pmap", dataclasses.replace(STEP_CONFIG, batch_size=18), jax.local_devices()[:4])


def test_auto_picks_sharding_when_there_are_several_devices_and_jit_for_one():
    assert jax.local_device_count() == 4
    assert make_strategy("auto", STEP_CONFIG).name == "sharding"
    assert make_strategy("auto", dataclasses.replace(STEP_CONFIG, parallel="pmap")).name == "pmap"
    assert make_strategy("auto", dataclasses.replace(STEP_CONFIG, parallel="jit")).name == "jit"
    with mock.patch.object(jax, "device_count", return_value=1):
        assert make_strategy("auto", STEP_CONFIG).name == "jit"


def test_pmap_state_goes_to_every_device_and_comes_back_unchanged():
    state = steps.create_train_state(STEP_CONFIG)
    strategy = make_strategy("pmap", STEP_CONFIG)
    placed = strategy.put_state(state)
    kernel = placed.params["block1"]["conv"]["kernel"]
    assert kernel.shape == (4,) + state.params["block1"]["conv"]["kernel"].shape
    assert {shard.device for shard in kernel.addressable_shards} == set(jax.local_devices())
    jax.tree_util.tree_map(np.testing.assert_array_equal, strategy.get_state(placed), jax.device_get(state))


def test_jit_and_sharding_draw_the_same_dropout_masks():
    """Under sharding the step is jit's, with the same key: dropout masks do
    not depend on how the batch is split, so the parameters agree to float rounding. A step from
    another seed's key, the same parameters otherwise, does not."""
    config = dataclasses.replace(STEP_CONFIG, dropout_rate=0.5)
    batch = random_batch(config.batch_size, config.batch_size)
    initial = jax.device_get(steps.create_train_state(config))  # host copies: each step donates its input
    other_key = initial.replace(dropout_key=steps.create_train_state(dataclasses.replace(config, seed=1)).dropout_key)
    results = {}
    for name, strategy, state in (("jit", make_strategy("jit", config), initial),
                                  ("sharding", make_strategy("sharding", config), initial),
                                  ("other key", make_strategy("jit", config), other_key)):
        new_state, _ = one_train_step(strategy, strategy.put_state(state), batch)
        results[name] = jax.tree_util.tree_leaves(strategy.get_state(new_state).params)
    for jit_leaf, sharded_leaf in zip(results["jit"], results["sharding"]):
        np.testing.assert_allclose(sharded_leaf, jit_leaf, rtol=1e-4, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(results["jit"], results["other key"])) > 1e-3
