"""Progress within an epoch: a tqdm bar with images/s and ETA, and optional plain step lines.

JAX dispatches steps asynchronously, so the host can queue a whole epoch before the device has
finished its first step; a bar that counted dispatched steps would race to 100% and then wait.
`StepProgress` counts a step once it is done, and waits only for the step `LAG_STEPS` before the
one just dispatched: the devices always have the next steps queued, so the loop never stalls on
the bar, and the host never runs further ahead than that. Running loss and accuracy are fetched
to the host only every `log_every_steps` steps and, for the bar, at most every few seconds.

The bar is drawn only when stderr is a terminal (tqdm's `disable=None`), so CI logs stay
readable; the step lines of `log_every_steps` are written either way.
"""

import collections
import time
from typing import Callable, Optional

import jax
import tqdm

from nin_jax import distributed, input_pipeline, steps

POSTFIX_EVERY_SECONDS = 5.0
LAG_STEPS = 8


def running_metrics(totals: steps.Metrics) -> dict[str, float]:
    """Mean loss and accuracy of the examples summed into the host values `totals` so far."""
    count = float(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count, "acc": float(totals["correct"]) / count}


class StepProgress:
    """Call `update(totals)` after dispatching each step with the running sums on the device,
    `close()` at the end; `fetch` brings running sums to the host (`strategy.fetch`)."""

    def __init__(self, desc: str, num_examples: int, batch_size: int, log: Callable[[str], None] = print,
                 log_every_steps: int = 0, start_batch: int = 0,
                 fetch: Callable[[steps.Metrics], steps.Metrics] = jax.device_get):
        self._desc = desc
        self._fetch = fetch
        self._num_examples = num_examples
        self._num_steps = input_pipeline.num_batches(num_examples, batch_size)
        self._batch_size = batch_size
        self._log = log
        self._log_every_steps = log_every_steps
        self._steps_done = start_batch  # a resumed epoch starts part-way
        self._examples_done = min(start_batch * batch_size, num_examples)
        self._bar = tqdm.tqdm(total=num_examples, initial=self._examples_done, desc=desc, unit="img", unit_scale=True,
                              leave=False, disable=None if distributed.is_main_process() else True, dynamic_ncols=True)
        self._pending: collections.deque[steps.Metrics] = collections.deque()
        self._last_log = (self._examples_done, time.perf_counter())  # (examples done, time) at the last step line
        self._last_postfix_time = time.perf_counter()

    def update(self, totals: steps.Metrics) -> Optional[steps.Metrics]:
        """Keeps this step's totals; once more than `LAG_STEPS` steps are pending, waits for the
        oldest, counts it and returns its totals (still on the device), else returns None."""
        self._pending.append(totals)
        if len(self._pending) > LAG_STEPS:
            return self._count(self._pending.popleft())
        return None

    def close(self) -> None:
        """Waits for and counts every pending step."""
        while self._pending:
            self._count(self._pending.popleft())
        self._bar.close()

    def _count(self, totals: steps.Metrics) -> steps.Metrics:
        jax.block_until_ready(totals["count"])  # one output of the step stands for all: they are ready together
        examples = min(self._batch_size, self._num_examples - self._examples_done)
        self._steps_done += 1
        self._examples_done += examples
        self._bar.update(examples)
        if self._log_every_steps and self._steps_done % self._log_every_steps == 0:
            self._log_step(running_metrics(self._fetch(totals)))
        elif not self._bar.disable and time.perf_counter() - self._last_postfix_time > POSTFIX_EVERY_SECONDS:
            self._bar.set_postfix({name: f"{value:.3f}" for name, value in running_metrics(self._fetch(totals)).items()})
            self._last_postfix_time = time.perf_counter()
        return totals

    def _log_step(self, metrics: dict[str, float]) -> None:
        last_examples, last_time = self._last_log
        now = time.perf_counter()
        images_per_sec = (self._examples_done - last_examples) / (now - last_time)
        self._last_log = (self._examples_done, now)
        line = (f"{self._desc} step {self._steps_done}/{self._num_steps}: loss {metrics['loss']:.3f}, "
                f"acc {metrics['acc']:.3f}, {images_per_sec:.1f} images/s")
        with tqdm.tqdm.external_write_mode():
            self._log(line)
