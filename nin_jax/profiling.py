"""`--profile_steps N`: a `jax.profiler` trace of N training steps into <workdir>/profile.

The trace starts after the run's first step, once the steps run at their usual pace, and stops
when the N-th traced step has finished on the device. View it with
`tensorboard --logdir <workdir>/profile` (Profile tab; `pip install tensorboard-plugin-profile`),
or open the perfetto_trace.json.gz under <workdir>/profile/plugins/profile/ at https://ui.perfetto.dev.
"""

import os
from typing import Any, Callable, Optional

import jax

from nin_jax.errors import ConfigError

PROFILE_DIR = "profile"


def check_profile_steps(num_steps: int, workdir: Optional[str]) -> None:
    """Refuses --profile_steps without a workdir to write the trace into."""
    if num_steps and not workdir:
        raise ConfigError("--profile_steps needs a --workdir to write the trace into")


class StepTrace:
    """Call `after_step(output)` with what each training step returned; the trace spans the steps
    after the first, `num_steps` of them. Without a workdir or with 0 steps it does nothing. Use
    it as a context manager, so that a run that ends early still closes the trace."""

    def __init__(self, workdir: Optional[str], num_steps: int, log: Callable[[str], None] = print):
        self.directory = os.path.join(workdir, PROFILE_DIR) if workdir and num_steps else None
        self._num_steps = num_steps
        self._log = log
        self._steps_seen = 0
        self._tracing = False

    def after_step(self, output: Any) -> None:
        if not self.directory:
            return
        self._steps_seen += 1
        if self._steps_seen == 1:
            jax.block_until_ready(output)  # the trace holds the traced steps only
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self._tracing = True
        elif self._tracing and self._steps_seen == 1 + self._num_steps:
            jax.block_until_ready(output)
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self._tracing = False
        traced = self._steps_seen - 1
        self._log(f"wrote a profile of {traced} training step{'s' if traced != 1 else ''} to {self.directory}; "
                  f"view it with `tensorboard --logdir {self.directory}` or at https://ui.perfetto.dev")

    def __enter__(self) -> "StepTrace":
        return self

    def __exit__(self, *exc_info) -> None:
        if self._tracing:  # the run had fewer steps than asked for, or stopped
            self._stop()
