"""How the steps run: `jax.jit` over a device mesh with sharded batches (`sharding`, the way current
JAX recommends, and `auto`'s choice; on one device, `jit`), or `jax.pmap` over every local device
(in maintenance mode in JAX, kept for those who want it).

A strategy compiles the `LoopSteps` it is given for its devices (`trainer.loop_steps`: the pure
steps with the loop's running sums) and owns the layout of states and batches there, so the
training loop is the same for all: `put_state` and `zero_carry` (or `put_carry`), then
`train_step(state, carry, batch, stop)` and `eval_step(state, totals, batch)` with this process's
NumPy batches (the whole global batch when there is one process), `fetch` for host values and
`get_state` for a host copy of the state. Benchmarks and tests use the same calls.

Batches are handed to the compiled steps as NumPy arrays: the call moves them to the devices
faster than a `jax.device_put` of its own would.
"""

import concurrent.futures
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nin_jax.config import Config, ConfigError
from nin_jax.ops import choices

AXIS_NAME = "batch"


class LoopSteps(NamedTuple):
    """The two steps a strategy compiles, as the training loop calls them, and where their sums start."""

    train: Callable[..., Any]  # (state, carry, batch) -> (state, carry); the batch holds this process's `stop` votes
    evaluate: Callable[..., Any]  # (state, totals, batch) -> totals
    zero_carry: Any
    zero_totals: Any


StepsForAxis = Callable[[Optional[str]], LoopSteps]  # the steps for a pmap's axis name, or None under jit


def _check_batch_splits(batch_size: int, count: int) -> None:
    if batch_size % count:
        raise ConfigError(f"--batch_size {batch_size} does not split evenly over {count} devices; use a multiple of {count}")


class ShardingStrategy:
    """The unchanged steps under `jax.jit` on a one-axis `Mesh` of `devices`: batches are sharded
    along 'batch', the state is replicated, and XLA inserts the cross-device sums that the pmap
    strategy writes out with `lax.psum`. On one device this is plain `jax.jit` (named so): the
    program compiled for a one-device mesh is the one jit compiles (docs/performance.md)."""

    def __init__(self, config: Config, steps_for_axis: StepsForAxis, devices: list):
        self.devices, self.num_devices = devices, len(devices)
        self.name = "sharding" if len(devices) > 1 else "jit"
        _check_batch_splits(config.batch_size, self.num_devices)
        mesh = Mesh(np.array(self.devices), (AXIS_NAME,))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._batch_sharding = NamedSharding(mesh, PartitionSpec(AXIS_NAME))
        self._steps = steps_for_axis(None)
        options = choices.compiler_options(config.cpu_kernels, self.devices[0].platform)
        self._train = jax.jit(self._steps.train, in_shardings=(self._replicated, self._replicated, self._batch_sharding),
                              out_shardings=(self._replicated, self._replicated), donate_argnums=0,
                              compiler_options=options)
        self._eval = jax.jit(self._steps.evaluate, in_shardings=(self._replicated, self._replicated, self._batch_sharding),
                             out_shardings=self._replicated, compiler_options=options)
        self._init_votes(sum(device.process_index == jax.process_index() for device in self.devices))

    def _init_votes(self, num_local_devices: int) -> None:
        """This process's stop vote, 0 or 1 on each of its devices, placed once for every batch."""
        self._votes = tuple(self._lay_out({"stop": np.full(num_local_devices, vote, np.float32)})["stop"]
                            for vote in (0, 1))
        self._zero_carry = self._zero_totals = None

    def put_state(self, state: Any) -> Any:
        """From host values: a restored state's arrays may sit on one device of this process,
        from which no process can reach the others' devices."""
        return jax.device_put(jax.device_get(state), self._replicated)

    def put_carry(self, carry: Any) -> Any:
        """The loop's running sums go where the state goes: every device holds them whole."""
        return self.put_state(carry)

    def get_state(self, state: Any) -> Any:
        return jax.device_get(state)

    def fetch(self, carry: Any) -> Any:
        """The host values of a carry or running sums; waits for the step that made them."""
        return jax.device_get(carry)

    def _lay_out(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Each process hands over its own slice; together they form the global batch. One
        process's NumPy batch is the global batch already, and the step shards it."""
        if jax.process_count() == 1:
            return batch
        return jax.make_array_from_process_local_data(self._batch_sharding, batch)

    def _with_vote(self, batch: dict[str, Any], stop: bool) -> dict[str, Any]:
        return {**batch, "stop": self._votes[bool(stop)]}

    def zero_carry(self) -> dict[str, Any]:
        """The loop steps' zero carry on the devices, made once: the steps never change their inputs."""
        if self._zero_carry is None:
            self._zero_carry = self.put_carry(self._steps.zero_carry)
        return self._zero_carry

    def compile(self, state: Any, batch: dict[str, np.ndarray],
                before: Callable[[tuple[jax.stages.Lowered, jax.stages.Lowered]], Any] = lambda lowered: None) -> float:
        """Compiles both steps ahead of time for this state and batch layout; returns seconds.
        `before(lowered)` sees the lowered train and eval steps first. The two compile at the same
        time: XLA compiles without holding Python's lock, much of a GPU compile waits on the
        device's autotuning, and on a 2-core CPU side by side was faster too (docs/performance.md)."""
        start = time.perf_counter()
        zero = self.zero_carry()
        lowered = (self._train.lower(state, zero, self._with_vote(self._lay_out(batch), False)),
                   self._eval.lower(state, self.zero_totals(), self._lay_out(batch)))
        before(lowered)
        with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
            self._train, self._eval = pool.map(lambda step: step.compile(), lowered)
        return time.perf_counter() - start

    def train_program(self) -> Optional[str]:
        """The compiled train step's optimised program (HLO text), once `compile` has run."""
        return self._train.as_text() if isinstance(self._train, jax.stages.Compiled) else None

    def lower(self, state: Any, batch: dict[str, Any]) -> tuple[jax.stages.Lowered, jax.stages.Lowered]:
        """The train and eval steps lowered for a host state and a global batch given by their
        shapes and dtypes (arrays or `jax.ShapeDtypeStruct`s), on this strategy's devices, which
        need not be attached: `nin_jax.plan` compiles them for hardware that is not there."""
        spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)  # noqa: E731
        state = self._state_spec(jax.tree_util.tree_map(spec, state))
        carry, totals = jax.tree_util.tree_map(spec, (self._steps.zero_carry, self._steps.zero_totals))
        batch = self._batch_spec({name: spec(x) for name, x in batch.items()})
        votes = self._batch_spec({"stop": jax.ShapeDtypeStruct((self.num_devices,), np.float32)})
        return (self._train.lower(state, carry, {**batch, **votes}), self._eval.lower(state, totals, batch))

    def _state_spec(self, state: Any) -> Any:
        return state

    def _batch_spec(self, batch: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.ShapeDtypeStruct]:
        return batch

    def train_step(self, state: Any, carry: dict[str, Any], batch: dict[str, np.ndarray],
                   stop: bool = False) -> tuple[Any, dict[str, Any]]:
        """One step that also adds into `carry` (`trainer.loop_steps`); `stop` is this process's vote to
        stop. Returns at once, before the devices have finished the step."""
        return self._train(state, carry, self._with_vote(self._lay_out(batch), stop))

    def eval_step(self, state: Any, totals: Any, batch: dict[str, np.ndarray]) -> Any:
        """`totals` plus the metric sums of one padded batch."""
        return self._eval(state, totals, self._lay_out(batch))

    def zero_totals(self) -> Any:
        """Where evaluation's running sums start, on the devices, made once."""
        if self._zero_totals is None:
            self._zero_totals = self.put_carry(self._steps.zero_totals)
        return self._zero_totals


class PmapStrategy(ShardingStrategy):
    """The steps under `jax.pmap(axis_name='batch')` over all local devices: the state is
    replicated, every batch is split into equal per-device shards. With several processes, each
    runs this on its own devices and slice of the batch, and `psum` spans all of them.
    `jax.pmap` takes no compiler options: on CPU devices it runs XLA's default kernels
    (`--cpu_kernels` applies to jit and sharding).

    pmap runs on `jit` and `shard_map`, and indexing its outputs (`x[0]`) costs a
    dispatch: so the state is placed and read back through its sharding, and the metrics, summed
    over devices inside the step, come out unmapped (`out_axes=None`), one value for all devices;
    so does the loop's carry, which goes in unmapped (`in_axes=None`).
    """

    name = "pmap"

    def __init__(self, config: Config, steps_for_axis: StepsForAxis, devices: Optional[list] = None):
        self.devices = devices or jax.local_devices()
        self.num_devices = len(self.devices) * jax.process_count()
        _check_batch_splits(config.batch_size, self.num_devices)
        self._stacked = NamedSharding(Mesh(np.array(self.devices), (AXIS_NAME,)), PartitionSpec(AXIS_NAME))
        self._steps = steps_for_axis(AXIS_NAME)
        # Naming devices confines pmap to them; unnamed, it spans the devices of every process.
        self._train = jax.pmap(self._steps.train, axis_name=AXIS_NAME, in_axes=(0, None, 0), out_axes=(0, None),
                               donate_argnums=0, devices=devices)
        self._eval = jax.pmap(self._steps.evaluate, axis_name=AXIS_NAME, in_axes=(0, None, 0), out_axes=None,
                              devices=devices)
        self._init_votes(len(self.devices))

    def compile(self, state, batch, before=lambda lowered: None):
        """With several processes, pmap's ahead-of-time executables want global arrays; so the
        steps are compiled by running each once, the train step on a throwaway copy of `state`
        (`before` is not called). The seconds returned include those two runs."""
        start = time.perf_counter()
        jax.block_until_ready(self.train_step(self.put_state(self.get_state(state)), self.zero_carry(), batch))
        jax.block_until_ready(self.eval_step(state, self.zero_totals(), batch))
        return time.perf_counter() - start

    def put_state(self, state):
        """One copy per local device, stacked along a leading axis."""

        def stack(x):
            return jax.device_put(np.broadcast_to(x, (len(self.devices),) + np.shape(x)), self._stacked)

        return jax.tree_util.tree_map(stack, jax.device_get(state))

    def put_carry(self, carry):
        return jax.device_put(carry)

    def get_state(self, state):
        return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_shards[0].data)[0], state)

    def _lay_out(self, batch):
        shard = lambda x: x.reshape((len(self.devices), -1) + x.shape[1:])  # noqa: E731
        return jax.tree_util.tree_map(shard, batch)

    def _state_spec(self, state):
        stacked = lambda x: jax.ShapeDtypeStruct((len(self.devices),) + x.shape, x.dtype)  # noqa: E731
        return jax.tree_util.tree_map(stacked, state)

    def _batch_spec(self, batch):
        shard = lambda x: jax.ShapeDtypeStruct((len(self.devices), x.shape[0] // len(self.devices)) + x.shape[1:],  # noqa: E731
                                               x.dtype)
        return jax.tree_util.tree_map(shard, batch)


def _mode(config: Config) -> str:
    if config.parallel == "auto":
        return "sharding" if jax.device_count() > 1 else "jit"
    return config.parallel


def num_devices(config: Config) -> int:
    """How many devices the strategy of `--parallel` runs on; refuses, in a ConfigError, what it
    cannot run: jit on several processes, a batch that does not split over the devices."""
    mode = _mode(config)
    if mode == "jit":
        if jax.process_count() > 1:
            raise ConfigError("--parallel jit runs on one device; with several processes use pmap or sharding")
        return 1
    count = len(jax.local_devices()) * jax.process_count() if mode == "pmap" else jax.device_count()
    _check_batch_splits(config.batch_size, count)
    return count


def create_strategy(config: Config, steps_for_axis: StepsForAxis, devices: Optional[list] = None):
    """The strategy that `--parallel` names, for the loop steps `steps_for_axis` (`trainer.loop_steps`),
    on `devices` (default: this machine's; `nin_jax.plan` passes devices that are not attached)."""
    mode = _mode(config)
    if mode == "pmap":
        return PmapStrategy(config, steps_for_axis, devices)
    if devices is None:
        devices = jax.devices()[:num_devices(config)]
    return ShardingStrategy(config, steps_for_axis, devices[:1] if mode == "jit" else devices)


def describe_devices(strategy) -> str:
    """'2 cpu devices', '1 gpu device', '4 cpu devices in 2 processes': for the per-epoch line."""
    platform = jax.local_devices()[0].platform
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"{strategy.num_devices} {platform} device{'s' if strategy.num_devices > 1 else ''}{processes}"
