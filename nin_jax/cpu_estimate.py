"""How long the reference recipe will take on this CPU, measured before training starts.

At 224x224 a CPU trains NiN so slowly that the book's 10 epochs take many hours.
People should learn that in the first minute, not the first hour, together with a quick run that
shows the same learning in minutes. The estimate times a few real steps (after compilation) on a
copy of the initial state, so training itself is unchanged.
"""

import time
from typing import Any, Callable

import jax

from nin_jax import input_pipeline, steps
from nin_jax.config import Config

ESTIMATE_FROM_RESIZE = 160
QUICK_RUN = "--resize 96 --num_epochs 2"
TIMED_STEPS = 2


def applies(config: Config) -> bool:
    """Only for the expensive resolutions, and only when there is no accelerator."""
    return jax.default_backend() == "cpu" and config.resize >= ESTIMATE_FROM_RESIZE


def seconds_per_step(step: Callable[[Any], tuple[Any, Any]], carry: Any,
                     num_steps: int = TIMED_STEPS) -> tuple[float, Any]:
    """Mean seconds of `carry, output = step(carry)` over `num_steps` calls after one untimed
    warm-up call, and the last carry."""
    carry, _ = jax.block_until_ready(step(carry))
    start = time.perf_counter()
    for _ in range(num_steps):
        carry, _ = jax.block_until_ready(step(carry))
    return (time.perf_counter() - start) / num_steps, carry


def format_duration(seconds: float) -> str:
    for unit, length in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f} {unit}"
    return f"{seconds:.1f} seconds"


def estimate_line(train_step_seconds: float, eval_step_seconds: float, config: Config,
                  num_train_examples: int, num_test_examples: int) -> str:
    train_steps = input_pipeline.num_batches(num_train_examples, config.batch_size)
    eval_steps = input_pipeline.num_batches(num_test_examples, config.batch_size)
    total = config.num_epochs * (train_steps * train_step_seconds + eval_steps * eval_step_seconds)
    return (
        f"no accelerator: on this CPU a training step at {config.resize}x{config.resize} takes "
        f"{train_step_seconds:.1f}s, so {config.num_epochs} epoch{'s' if config.num_epochs > 1 else ''} of "
        f"{train_steps} steps will take about "
        f"{format_duration(total)}; for a quick run try {QUICK_RUN}"
    )


def measure_and_estimate(strategy, state: steps.TrainState, batch: input_pipeline.Batch, config: Config,
                         num_train_examples: int, num_test_examples: int) -> str:
    """Times train and eval steps on a copy of `state` (which stays as it is) and returns the
    estimate line."""
    copy = strategy.put_state(strategy.get_state(state))
    train_seconds, copy = seconds_per_step(lambda s: strategy.train_step(s, strategy.zero_carry(), batch), copy)
    eval_seconds, _ = seconds_per_step(lambda s: (s, strategy.eval_step(s, strategy.zero_totals(), batch)), copy)
    return estimate_line(train_seconds, eval_seconds, config, num_train_examples, num_test_examples)
