"""How long the reference recipe will take on this CPU, said as training starts.

At 224x224 a CPU trains NiN so slowly that the book's 10 epochs take many hours. People should
learn that from the first step, not after an hour, together with a quick run that shows the same
learning in minutes. `Estimate` times the run's own first steps, so it costs the run nothing but
a wait for those steps and one evaluation step: a first line after the first step, then a second
after `TIMED_STEPS` more, which no longer carry the first one's start-up costs.
"""

import time
from typing import Any, Callable

import jax
import tqdm

from nin_jax import input_pipeline
from nin_jax.config import Config

ESTIMATE_FROM_RESIZE = 160
QUICK_RUN = "--resize 96 --num_epochs 2"
TIMED_STEPS = 2


def applies(config: Config) -> bool:
    """Only for the expensive resolutions, and only when there is no accelerator."""
    return jax.default_backend() == "cpu" and config.resize >= ESTIMATE_FROM_RESIZE


def format_duration(seconds: float) -> str:
    for unit, length in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f} {unit}"
    return f"{seconds:.1f} seconds"


def total_seconds(train_step_seconds: float, eval_step_seconds: float, config: Config, num_train_examples: int,
                  num_test_examples: int) -> float:
    """The whole run's steps: every epoch's training and its evaluation."""
    train_steps = input_pipeline.num_batches(num_train_examples, config.batch_size)
    eval_steps = input_pipeline.num_batches(num_test_examples, config.batch_size)
    return config.num_epochs * (train_steps * train_step_seconds + eval_steps * eval_step_seconds)


def estimate_line(train_step_seconds: float, eval_step_seconds: float, config: Config,
                  num_train_examples: int, num_test_examples: int) -> str:
    train_steps = input_pipeline.num_batches(num_train_examples, config.batch_size)
    total = total_seconds(train_step_seconds, eval_step_seconds, config, num_train_examples, num_test_examples)
    return (
        f"no accelerator: on this CPU the first training step at {config.resize}x{config.resize} took "
        f"{train_step_seconds:.1f}s and an evaluation step {eval_step_seconds:.1f}s, so {config.num_epochs} "
        f"epoch{'s' if config.num_epochs > 1 else ''} of {train_steps} steps will take about "
        f"{format_duration(total)}; for a quick run try {QUICK_RUN}"
    )


class Estimate:
    """Create it just before the first train step and call `after_step(state, carry)` after each
    one is dispatched; it waits for the steps it times and logs its lines through `log`."""

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
            line = estimate_line(seconds, self._eval_step_seconds, self._config, *self._examples)
        else:
            seconds /= TIMED_STEPS
            total = total_seconds(seconds, self._eval_step_seconds, self._config, *self._examples)
            line = (f"steps 2 to {self._steps} took {seconds:.1f}s each: the {self._config.num_epochs} "
                    f"epoch{'s' if self._config.num_epochs > 1 else ''} will take about {format_duration(total)}")
        with tqdm.tqdm.external_write_mode():  # above the progress bar, not at its end
            self._log(line)
        self._start = time.perf_counter()
