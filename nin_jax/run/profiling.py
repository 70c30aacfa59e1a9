"""`--profile_steps N`: a `jax.profiler` trace of N training steps into <workdir>/profile.

The trace starts after the run's first step, once the steps run at their usual pace, and stops
when the N-th traced step has finished on the device; then the run prints where the step's time
went (`nin_jax.profile_report`, which reads the step's optimised program saved beside the trace).
View the trace with `tensorboard --logdir <workdir>/profile` (Profile tab; `pip install -e
'.[profile]'` adds the plugin), or open the perfetto_trace.json.gz under
<workdir>/profile/plugins/profile/ at https://ui.perfetto.dev.
"""

import json
import os
from typing import Any, Callable, Optional

import jax

from nin_jax.runtime import files
from nin_jax.run import profile_report
from nin_jax.runtime.errors import OutputError

PROFILE_DIR = "profile"
# The folders of the trace that jax.profiler writes into: made, and checked to lead nowhere else, before it starts.
TRACE_FOLDERS = (PROFILE_DIR, "plugins", "profile")


class StepTrace:
    """Call `after_step(output)` with what each training step returned; the trace spans the steps
    after the first, `num_steps` of them. Without a workdir or with 0 steps it does nothing. Use
    it as a context manager, so that a run that ends early still closes the trace."""

    def __init__(self, workdir: Optional[str], num_steps: int, log: Callable[[str], None] = print,
                 program: Callable[[], Optional[str]] = lambda: None):
        self.directory = os.path.join(workdir, PROFILE_DIR) if workdir and num_steps else None
        self._num_steps = num_steps
        self._log = log
        self._program = program  # the train step's optimised program, where the strategy has it
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
                  f"view it at https://ui.perfetto.dev (open its perfetto_trace.json.gz), or with `tensorboard --logdir "
                  f"{self.directory}` once `pip install -e '.[profile]'` has added TensorBoard's profile plugin")
        try:
            program = self._program()
            if program:
                files.write_text(os.path.join(self.directory, profile_report.HLO_FILE), program)
            files.write_text(os.path.join(self.directory, profile_report.STEPS_FILE), json.dumps({"steps": traced}))
            self._log(profile_report.format_report(profile_report.report(self.directory)))
        except (profile_report.ProfileError, OutputError, OSError, ValueError) as error:
            self._log(f"no table of where the step's time went: {error}")

    def __enter__(self) -> "StepTrace":
        return self

    def __exit__(self, *exc_info) -> None:
        if self._tracing:  # the run had fewer steps than asked for, or stopped
            self._stop()
