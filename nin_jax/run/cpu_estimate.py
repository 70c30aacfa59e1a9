"""How long a run will take on this CPU, said before it compiles, with a command that finishes in
minutes where the run takes more than an hour.

At 224x224 a CPU trains NiN so slowly that the book's 10 epochs take most of a day. People should
learn that before the run starts, together with a quick run that shows the same learning in
minutes, as a command they can paste. `say_before_compiling` reckons the run's length from its
steps' floating-point operations (XLA's count of the lowered steps) and this CPU's speed at a
matrix product, measured in a fraction of a second, of which NiN's steps reach `NIN_SHARE`.
`Estimate` then times the run's own first steps, and says how long the run takes at their pace.
"""

import os
import shlex
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import tqdm

from nin_jax import input_pipeline
from nin_jax.config import Config

# The share of this CPU's matrix-product speed (`matmul_flops_per_second`) that NiN's train and
# eval steps reach, measured on a 2-core x86-64 CPU (docs/performance.md, "The CPU's estimate").
NIN_SHARE = 1.24
SAY_FROM_SECONDS = 600  # shorter runs start without a word
HINT_FROM_SECONDS = 3600
# The quick run: the same recipe on smaller images and a part of the data, in a workdir of its own;
# on a 2-core CPU it finishes in minutes, far above chance (docs/results.md, "Quick runs").
QUICK_FLAGS = {"--resize": "67", "--num_epochs": "2", "--train_examples": "19200", "--eval_examples": "2000"}
TIMED_STEPS = 2


def applies() -> bool:
    """Only where there is no accelerator."""
    return jax.default_backend() == "cpu"


def format_duration(seconds: float) -> str:
    for unit, length in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f} {unit}"
    return f"{seconds:.1f} seconds"


def quick_command(argv: list[str], workdir: Optional[str]) -> str:
    """The command the user typed (`argv`, sys.argv of train.py), with the quick run's flags in
    place of its own size and length, and a workdir of its own: a command to paste as it is."""
    replaced = {*QUICK_FLAGS, "--workdir"}
    kept, skip = [], False
    for arg in argv[1:]:
        name = arg.split("=", 1)[0]
        if skip or name in replaced:
            skip = not skip and "=" not in arg and name in replaced
            continue
        kept.append(arg)
    quick = [flag_or_value for flag in QUICK_FLAGS.items() for flag_or_value in flag]
    if workdir:
        quick += ["--workdir", f"{workdir.rstrip(os.sep)}_quick"]
    return shlex.join([os.path.basename(sys.executable), argv[0], *kept, *quick])


def matmul_flops_per_second(size: int = 1024, repeats: int = 5) -> float:
    """This CPU's speed at a float32 matrix product under XLA, the best of a few (about 0.2 s)."""
    product = jax.jit(lambda a, b: a @ b)
    a = jnp.ones((size, size), jnp.float32)
    jax.block_until_ready(product(a, a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(product(a, a))
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def xla_flops(stage) -> Optional[float]:
    """XLA's count of the floating-point operations of a lowered or compiled step, whatever shape
    this JAX gives its cost analysis in (a dict, a list of one dict per program, None, an error);
    None where it gives none."""
    try:
        analysis = stage.cost_analysis()
    except Exception:  # a backend or a JAX without the analysis: its kinds vary
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = analysis.get("flops") if isinstance(analysis, dict) else None
    return float(flops) if flops else None


def total_seconds(train_step_seconds: float, eval_step_seconds: float, config: Config, num_train_examples: int,
                  num_test_examples: int) -> float:
    """The whole run's steps: every epoch's training and its evaluation."""
    train_steps = input_pipeline.num_batches(num_train_examples, config.batch_size)
    eval_steps = input_pipeline.num_batches(num_test_examples, config.batch_size)
    return config.num_epochs * (train_steps * train_step_seconds + eval_steps * eval_step_seconds)


def say_before_compiling(lowered: tuple[Any, Any], config: Config, num_examples: tuple[int, int], workdir: Optional[str],
                         log: Callable[[str], None]) -> bool:
    """Says how long the run will take on this CPU, from its lowered train and eval steps, where
    that is more than `SAY_FROM_SECONDS`, and returns whether it did; where it is more than an
    hour, it adds the quick command."""
    flops = [xla_flops(stage) for stage in lowered]
    if not all(flops):
        return False
    rate = matmul_flops_per_second() * NIN_SHARE
    seconds = total_seconds(flops[0] / rate, flops[1] / rate, config, *num_examples)
    if seconds < SAY_FROM_SECONDS:
        return False
    line = (f"no accelerator: on this CPU the {config.num_epochs} epoch{'s' if config.num_epochs > 1 else ''} at "
            f"{config.resize}x{config.resize} will take about {format_duration(seconds)} (from the steps' "
            f"{flops[0] / config.batch_size / 1e9:.2f} GFLOP per training image and this CPU's speed; the first "
            f"steps will tell)")
    if seconds >= HINT_FROM_SECONDS:
        line += f". A quick run that finishes in minutes:\n  {quick_command(sys.argv, workdir)}"
    log(line)
    return True


class Estimate:
    """Create it just before the first train step and call `after_step(state, carry)` after each
    one is dispatched; it waits for the steps it times and logs its lines through `log`: a first
    line after the first step, then a second after `TIMED_STEPS` more, which no longer carry the
    first one's start-up costs."""

    def __init__(self, strategy, batch: input_pipeline.Batch, config: Config, num_train_examples: int,
                 num_test_examples: int, log: Callable[[str], None]):
        self._strategy = strategy
        self._batch = batch
        self._config = config
        self._examples = (num_train_examples, num_test_examples)
        self._log = log
        self._steps = 0
        self._eval_step_seconds = 0.0
        self._start = time.perf_counter()

    def after_step(self, state: Any, carry: Any) -> None:
        self._steps += 1
        if self._steps not in (1, 1 + TIMED_STEPS):
            return
        jax.block_until_ready(carry)
        seconds = time.perf_counter() - self._start
        if self._steps == 1:
            start = time.perf_counter()
            jax.block_until_ready(self._strategy.eval_step(state, self._strategy.zero_totals(), self._batch))
            self._eval_step_seconds = time.perf_counter() - start
            what = f"the first training step took {seconds:.1f}s and an evaluation step {self._eval_step_seconds:.1f}s"
        else:
            seconds /= TIMED_STEPS
            what = f"steps 2 to {self._steps} took {seconds:.1f}s each"
        total = total_seconds(seconds, self._eval_step_seconds, self._config, *self._examples)
        epochs = f"{self._config.num_epochs} epoch{'s' if self._config.num_epochs > 1 else ''}"
        with tqdm.tqdm.external_write_mode():  # above the progress bar, not at its end
            self._log(f"{what}: the {epochs} will take about {format_duration(total)}")
        self._start = time.perf_counter()
