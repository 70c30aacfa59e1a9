"""Progress within an epoch: a tqdm bar with images/s and the time left, and optional plain step
lines (`--log_every_steps`).

JAX dispatches steps asynchronously, so the host can queue a whole epoch before the device has
finished its first step; a bar that counted dispatched steps would race to 100% and then wait.
`StepProgress` counts a step once it is done, and waits only for the step some steps before the
one just dispatched: the devices always have the next steps queued, so the loop never stalls on
the bar, and the host never runs further ahead than that: at most `LAG_STEPS` steps, and no more
than about `IN_FLIGHT_SECONDS` of them, so that a stop request is acted on within seconds even
where a step takes seconds (a CPU at 224 px). Running loss and accuracy are fetched
to the host only every `log_every_steps` steps and, for the bar, at most every few seconds. The
bar is drawn only when stderr is a terminal (tqdm's `disable=None`), so CI logs stay readable;
the step lines of `log_every_steps` are written either way.
"""

import collections
import time
from typing import Callable, Optional

import jax
import tqdm

from nin_jax import input_pipeline, steps
from nin_jax.runtime import distributed

POSTFIX_EVERY_SECONDS = 5.0
LAG_STEPS = 8
IN_FLIGHT_SECONDS = 2.0


def running_metrics(totals: steps.Metrics) -> dict[str, float]:
    """Mean loss and accuracy of the examples summed into the host values `totals` so far."""
    count = float(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count, "acc": float(totals["correct"]) / count}


def _is_ready(value) -> bool:
    """Whether the step that made `value` is done (a host value is)."""
    return getattr(value, "is_ready", lambda: True)()


class StepProgress:
    """Call `update(totals)` after dispatching each step with the running sums on the device,
    `close()` at the end, or use it as a context manager, which closes it; `fetch` brings running
    sums to the host (`strategy.fetch`). Left by an exception, the bar is taken off the terminal at
    once, so that the line that says why starts a line of its own."""

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
        self._bar = tqdm.tqdm(total=num_examples, initial=self._examples_done, desc=desc, unit=" images", unit_scale=True,
                              leave=False, disable=None if distributed.is_main_process() else True, dynamic_ncols=True)
        self._pending: collections.deque[steps.Metrics] = collections.deque()
        self._since = (self._examples_done, time.perf_counter())  # the step lines' images/s count from here
        self._last_postfix_time = time.perf_counter()
        self._lag = 1  # steps left pending: one until a step's time is known
        self._last_waited: Optional[float] = None  # when the last step counted was done, if the host waited for it

    def update(self, totals: steps.Metrics) -> None:
        """Keeps this step's totals; once more steps are pending than the device runs in about
        `IN_FLIGHT_SECONDS` (at most `LAG_STEPS`), waits for the oldest and counts it. A step's
        time is taken from the end of a step the host waited for, behind which the next was queued,
        never from the count of a step that was done already (a checkpoint waited for it): that
        step took 0 s, and 8 steps queued up."""
        self._pending.append(totals)
        while len(self._pending) > self._lag:
            oldest = self._pending.popleft()
            waited = not _is_ready(oldest["count"])
            self._count(oldest)
            now = time.perf_counter()
            if self._last_waited is not None:  # the device ran this step, at most, in between
                self._lag = max(1, min(LAG_STEPS, int(IN_FLIGHT_SECONDS / max(now - self._last_waited, 1e-6))))
            self._last_waited = now if waited else None

    def close(self) -> None:
        """Waits for and counts every pending step."""
        while self._pending:
            self._count(self._pending.popleft())
        self._bar.close()

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            self.close()
        else:
            self._bar.close()  # without waiting for the pending steps

    def _count(self, totals: steps.Metrics) -> None:
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

    def _log_step(self, metrics: dict[str, float]) -> None:
        # Over the epoch so far, checkpoints included, like the epoch line's images/s: between
        # two step lines the counted steps are those the devices finished, which come in bursts
        # after a checkpoint has waited for all of them.
        first_examples, first_time = self._since
        images_per_sec = (self._examples_done - first_examples) / (time.perf_counter() - first_time)
        line = (f"{self._desc} step {self._steps_done}/{self._num_steps}: loss {metrics['loss']:.3f}, "
                f"acc {metrics['acc']:.3f}, {images_per_sec:.1f} images/s so far")
        with tqdm.tqdm.external_write_mode():
            self._log(line)
