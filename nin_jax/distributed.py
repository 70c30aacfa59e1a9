"""Several processes (hosts) training one model: JAX's multi-controller runtime.

Every process runs the same program on its own devices and its own slice of each batch; the
collectives inside the steps span the devices of all processes. Only process 0 talks to the user
and writes files.
"""

import jax

from nin_jax.config import Config
from nin_jax.input_pipeline import ProcessSlice


def initialize(config: Config) -> ProcessSlice:
    """Starts `jax.distributed` when the config asks for it; returns this process's data slice."""
    if config.coordinator_address:
        jax.distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    elif config.distributed:
        jax.distributed.initialize()  # the cluster (TPU, SLURM, ...) says who is who
    return ProcessSlice(jax.process_index(), jax.process_count())


def is_main_process() -> bool:
    return jax.process_index() == 0
