"""Where a training command's wall time goes, phase by phase: the command runs in this process as
`python train.py ...` would, while a thread looks at its main thread's stack every `--interval_s`
and adds the time since its last look to the phase the stack is in.

    python benchmarks/recipe_phases.py --out phases.json --launched_at "$(date +%s.%N)" -- train.py --recipe strong ...

The phases, by the innermost of the project's frames on the stack: `data` (nin_jax/data/),
`initial state` (steps.create_train_state: the parameters' initializer), `compile` (the run's compile), `evaluations` (trainer.evaluate), `checkpoints` (run/checkpoints.py),
`plots and files` (run/outputs.py, run/plots.py: metrics.jsonl, curves.png, TensorBoard events),
`epochs` (the rest of the training loop once it has compiled: the train steps and their hooks),
and `start-up` (the rest before that: the interpreter from `--launched_at`, imports, the initial
state). `first_step_s` is the time from `--launched_at` to the first look in the epochs; the exit
begins when the command calls `commands.exit_process`, and lasts until the process ends, which
only its launcher sees: `exit_began_s` is written for it. phases.json is rewritten at least every
half second and when the exit begins, so that a process killed midway leaves what it had seen.
The command's exit status is its own.
"""

import argparse
import collections
import json
import os
import runpy
import sys
import threading
import time
from typing import Optional

# (phase, a path under the repository, a function or None for any), from the innermost frame out.
RULES = (("checkpoints", "nin_jax/run/checkpoints.py", None),
         ("plots and files", "nin_jax/run/outputs.py", None),
         ("plots and files", "nin_jax/run/plots.py", None),
         ("evaluations", "nin_jax/trainer.py", "evaluate"),
         ("compile", "nin_jax/run/training_run.py", "compile"),
         ("data", "nin_jax/data/", None),
         ("initial state", "nin_jax/steps.py", "create_train_state"),
         ("loop", "nin_jax/trainer.py", "train_and_evaluate"))
WRITE_EVERY_S = 0.5


def phase_of(frame) -> Optional[str]:
    """The phase of the innermost frame that a rule names, or None."""
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        for phase, where, function in RULES:
            if where in path and function in (None, frame.f_code.co_name):
                return phase
        frame = frame.f_back
    return None


class PhaseSampler(threading.Thread):
    """Samples `thread_id`'s stack (see the module's docstring) and keeps phases.json up to date."""

    def __init__(self, thread_id: int, launched_at: float, out: str, interval_s: float):
        super().__init__(daemon=True)
        self._thread_id, self._launched_at, self._out, self._interval_s = thread_id, launched_at, out, interval_s
        self._lock = threading.Lock()
        self.seconds = collections.defaultdict(float)
        self.seconds["start-up"] = time.time() - launched_at
        self._last = self._written = time.time()
        self._compiled = False
        self.first_step_s: Optional[float] = None

    def run(self) -> None:
        """Looks until the process ends (a daemon thread), writing at least every WRITE_EVERY_S."""
        while True:
            time.sleep(self._interval_s)
            with self._lock:
                self._look(time.time())
                if time.time() - self._written >= WRITE_EVERY_S:
                    self._write({})

    def _look(self, now: float) -> None:
        """The time since the last look goes to the phase the stack is in now."""
        phase = phase_of(sys._current_frames().get(self._thread_id))
        if phase == "compile":
            self._compiled = True
        elif phase == "loop" or phase is None:
            phase = "epochs" if self._compiled else "start-up"
        if phase == "epochs" and self.first_step_s is None:
            self.first_step_s = now - self._launched_at
        self.seconds[phase] += now - self._last
        self._last = now

    def _write(self, extra: dict) -> None:
        """phases.json, replaced whole: a process killed while writing leaves the last one."""
        self._written = time.time()
        record = {"launched_at": self._launched_at, "phases_s": dict(self.seconds),
                  "first_step_s": self.first_step_s, "sampled_s": self._last - self._launched_at, **extra}
        with open(self._out + ".tmp", "w") as f:
            json.dump(record, f, indent=2)
        os.replace(self._out + ".tmp", self._out)

    def exit_begins(self) -> None:
        """The command has said all it will: its exit, to the process's end, begins now."""
        with self._lock:
            self._look(time.time())
            self._write({"exit_began_s": time.time() - self._launched_at})


def main(argv: Optional[list[str]] = None) -> None:
    """Runs the command in this process with the sampler watching, as `python COMMAND...` would."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the phases' JSON file")
    parser.add_argument("--launched_at", type=float, default=None,
                        help="when the command's launcher started it, in seconds since the epoch (default: now)")
    parser.add_argument("--interval_s", type=float, default=0.01, help="seconds between looks (default 0.01)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the script and its flags, e.g. -- train.py ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name the command to run after --, e.g. -- train.py --recipe strong")
    sampler = PhaseSampler(threading.get_ident(), args.launched_at or time.time(), args.out, args.interval_s)
    from nin_jax.runtime import commands  # no JAX: its exit is where the command's process ends

    exit_process = commands.exit_process

    def exit_after_writing(status) -> None:
        sampler.exit_begins()
        exit_process(status)

    commands.exit_process = exit_after_writing
    sys.argv = command
    sys.path[0] = os.path.dirname(os.path.abspath(command[0]))
    sampler.start()
    try:
        runpy.run_path(command[0], run_name="__main__")
    finally:  # a command that ends without commands.exit_process
        sampler.exit_begins()


if __name__ == "__main__":
    main()
