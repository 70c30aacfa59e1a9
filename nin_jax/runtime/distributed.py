"""Several processes (hosts) training one model: JAX's multi-controller runtime.

Every process runs the same program on its own devices and its own slice of each batch; the
collectives inside the steps span the devices of all processes. Only process 0 talks to the user
and writes files. How the processes end when one of them dies is in `nin_jax.peers`.
"""

import itertools
import socket

import jax

from nin_jax.input_pipeline import ProcessSlice
from nin_jax.runtime import peers
from nin_jax.config import Config
from nin_jax.config import ConfigError


def runtime_heartbeat_timeout(peer_timeout_s: int) -> int:
    """The runtime's own heartbeat and start timeouts: a backstop far enough above
    `--peer_timeout_seconds` for the `PeerWatch` and `peers.arrival_deadline` to speak first (the
    runtime was seen to act well before its nominal timeout)."""
    return 2 * peer_timeout_s + 30


def initialize(config: Config) -> ProcessSlice:
    """Starts `jax.distributed` when the config asks for it, and with peers, what ends this process
    in one line when one of them dies or never arrives; returns this process's data slice."""
    backstop = runtime_heartbeat_timeout(config.peer_timeout_seconds)
    timeouts = dict(heartbeat_timeout_seconds=backstop, initialization_timeout=backstop)
    address = config.coordinator_address
    if address or config.distributed:
        who, where = (f"all {config.num_processes} processes", f" at {address}") if address else ("all processes", "")
        never_arrived = (f"not {who} of this job reached the coordinator{where} within {config.peer_timeout_seconds} s "
                         f"(--peer_timeout_seconds); start every process, process 0 first, within that time of each "
                         f"other, or raise --peer_timeout_seconds")
        if address:
            _check_host(address)
        with peers.arrival_deadline(config.peer_timeout_seconds, never_arrived):
            if address:
                jax.distributed.initialize(address, config.num_processes, config.process_id, **timeouts)
            else:
                jax.distributed.initialize(**timeouts)  # the cluster (TPU, SLURM, ...) says who is who
    if jax.process_count() > 1:
        peers.route_runtime_log(jax.process_count())
        peers.PeerWatch(config.peer_timeout_seconds).start()
    return ProcessSlice(jax.process_index(), jax.process_count())


def _check_host(address: str) -> None:
    """Refuses a coordinator whose host name does not resolve, which the runtime would try to reach
    until its start timeout."""
    host, _, port = address.rpartition(":")
    try:
        socket.getaddrinfo(host.strip("[]"), int(port))
    except OSError as error:
        raise ConfigError(f"--coordinator_address {address}: cannot find the host {host} "
                          f"({error.strerror or error})") from None


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
