"""Several processes (hosts) training one model: JAX's multi-controller runtime.

Every process runs the same program on its own devices and its own slice of each batch; the
collectives inside the steps span the devices of all processes. Only process 0 talks to the user
and writes files. How the processes end when one of them dies is in `nin_jax.peers`.
"""

import dataclasses
import itertools

import jax
import numpy as np

from nin_jax import peers
from nin_jax.config import Config


@dataclasses.dataclass(frozen=True)
class ProcessSlice:
    """Which part of every global batch this process loads: with several processes (hosts) each
    reads only its own contiguous slice, and together they read the whole batch."""

    index: int = 0
    count: int = 1

    def of(self, values: np.ndarray) -> np.ndarray:
        size = len(values) // self.count
        return values[self.index * size : (self.index + 1) * size]


def runtime_heartbeat_timeout(peer_timeout_s: int) -> int:
    """The runtime's own heartbeat timeout: a backstop far enough above `--peer_timeout_seconds` for
    the `PeerWatch` to speak first (the runtime was seen to act well before its nominal timeout)."""
    return 2 * peer_timeout_s + 30


def initialize(config: Config) -> ProcessSlice:
    """Starts `jax.distributed` when the config asks for it, and with peers, what ends this process
    in one line when one of them dies; returns this process's data slice."""
    timeouts = dict(heartbeat_timeout_seconds=runtime_heartbeat_timeout(config.peer_timeout_seconds))
    if config.coordinator_address:
        jax.distributed.initialize(config.coordinator_address, config.num_processes, config.process_id, **timeouts)
    elif config.distributed:
        jax.distributed.initialize(**timeouts)  # the cluster (TPU, SLURM, ...) says who is who
    if jax.process_count() > 1:
        peers.route_runtime_log(jax.process_count())
        peers.PeerWatch(config.peer_timeout_seconds).start()
    return ProcessSlice(jax.process_index(), jax.process_count())


def is_main_process() -> bool:
    return jax.process_index() == 0


_decisions = itertools.count()


def from_process_0(name: str, value: str) -> str:
    """`value` as process 0 has it, on every process: for decisions that process 0 alone makes.
    Waits as long as it takes; a dead process 0 is the `PeerWatch`'s to notice."""
    if jax.process_count() == 1:
        return value
    key = f"{peers.KEY_PREFIX}{name}/{next(_decisions)}"  # every process makes the same decisions in the same order
    if is_main_process():
        peers.client().key_value_set(key, value)
        return value
    return peers.client().blocking_key_value_get(key, 24 * 3600 * 1000)
