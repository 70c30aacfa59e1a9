"""Why a run stops before its last epoch, and what it tells the user then: a stop signal, or a
training loss that is no longer finite. This module owns both, from the step on the devices to
the message; the loop asks one `StopWatch`.

A first Ctrl-C (SIGINT), SIGTERM or SIGHUP asks the loop to stop after the current step and save
a checkpoint; a second one, or one before training starts, stops the process at once
(`KeyboardInterrupt`, `Terminated`), and the entry point says so in one line. With several processes, all of them stop after
the same step, whichever of them the signal reached: each process votes with every step it
dispatches, and the step sums the votes of all processes on the devices (`watch_step`), so every
process reads the same sum after the same step. A non-finite training loss stops the run without
saving the bad state: the step records the first bad step (`watch_step`), and the loop looks at
that record where it waits for the devices anyway, before a checkpoint is saved and at the end of
an epoch (`StopWatch.check_finite`), so the message still names the first bad step.
"""

import collections
import contextlib
import signal
import threading
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from nin_jax.commands import STOP_SIGNALS


# The exit status of a process that stopped because another process was asked to: sysexits.h's
# EX_TEMPFAIL, "a temporary failure; the user is invited to retry".
STOPPED_BY_ANOTHER_PROCESS = 75

# How many steps back a process reads the summed votes with several processes: a step that the
# devices have surely finished, so reading it never stalls the queue of dispatched steps.
VOTE_LAG_STEPS = 8


class Interrupted(Exception):
    """The run stopped at a signal's request, after saving a checkpoint; `exit_code` is the
    process's exit status: 128 + the signal's number where the signal arrived,
    `STOPPED_BY_ANOTHER_PROCESS` elsewhere."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM or SIGHUP where the loop does not watch for them (before training starts, or a
    second one), raised like the KeyboardInterrupt of a SIGINT so that the entry point can say so."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block SIGTERM and SIGHUP raise `Terminated` instead of ending the process
    without a word (from the main thread only, where handlers can be installed)."""
    def terminate(signum, frame):
        raise Terminated(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, terminate) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; its message names the step."""


# ---------------------------------------------------------------------------------------------
# On the devices: what each train step adds to the loop's carry.

def zero_watch() -> dict[str, np.ndarray]:
    """The stop votes of all processes so far, and the first step whose loss was not finite
    (0: none yet) with that loss."""
    return {"stop_votes": np.zeros((), np.float32), "bad_step": np.zeros((), np.int32),
            "bad_loss": np.zeros((), np.float32)}


def watch_step(watch: dict[str, jax.Array], votes: jax.Array, step: jax.Array,
               loss_sum: jax.Array) -> dict[str, jax.Array]:
    """`watch` after the step that made the state's step `step` + 1 with `loss_sum`, where `votes`
    is the sum of all processes' votes for that step."""
    first_bad = (watch["bad_step"] == 0) & ~jnp.isfinite(loss_sum)
    return {"stop_votes": watch["stop_votes"] + votes,
            "bad_step": jnp.where(first_bad, step + 1, watch["bad_step"]).astype(jnp.int32),
            "bad_loss": jnp.where(first_bad, loss_sum, watch["bad_loss"])}


# ---------------------------------------------------------------------------------------------
# On the host: the loop's one interface.

class StopWatch:
    """Within `with StopWatch(...) as watch:` the first SIGINT, SIGTERM or SIGHUP only sets a request.

    Per step the loop hands `watch.vote` to the train step and asks `watch.agreed(carry)` (at an
    epoch's end `agreed_after_epoch`) whether to stop now; it saves, then raises
    `watch.interrupted(step)`. Before it saves or evaluates it
    passes the host values of its carry to `watch.check_finite`, which raises `Diverged`.
    Signal handlers can only be installed from the main thread; elsewhere signals keep their
    usual effect.
    """

    def __init__(self, num_processes: int, steps_per_epoch: int, learning_rate: float, resume: str,
                 fetch: Callable[[Any], Any] = jax.device_get):
        self._alone = num_processes == 1
        self._steps_per_epoch = steps_per_epoch
        self._learning_rate = learning_rate
        self._resume = resume
        self._fetch = fetch
        self._signum: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._in_flight: collections.deque = collections.deque()

    def __enter__(self) -> "StopWatch":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._request_stop) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore_handlers()

    def _request_stop(self, signum, frame) -> None:
        self._signum = signum
        self._restore_handlers()  # a second signal stops the run the usual way

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @property
    def vote(self) -> bool:
        """This process's vote to stop: whether a signal asked it to."""
        return self._signum is not None

    def agreed(self, carry: dict[str, Any]) -> bool:
        """Whether every process stops after the step that made `carry` (on the devices). One
        process decides at once; several read the summed votes of the step `VOTE_LAG_STEPS` back,
        which every process reads at the same step."""
        if self._alone:
            return self.vote
        self._in_flight.append(carry["watch"]["stop_votes"])
        if len(self._in_flight) <= VOTE_LAG_STEPS:
            return False
        return float(self._fetch(self._in_flight.popleft())) > 0

    def agreed_after_epoch(self, carry: dict[str, Any]) -> bool:
        """`agreed` at an epoch's end, from the host values of its carry: every step is done."""
        self._in_flight.clear()
        return self.vote if self._alone else float(carry["watch"]["stop_votes"]) > 0

    def interrupted(self, step: int) -> Interrupted:
        """The exception that ends this process, once its checkpoint is saved."""
        if self.vote:
            name = signal.Signals(self._signum).name
            return Interrupted(f"stopped by {name} after step {step}: {self._resume}", 128 + self._signum)
        return Interrupted(f"stopped after step {step} because another process of this run was asked to stop "
                           f"(SIGINT, SIGTERM or SIGHUP): {self._resume}", STOPPED_BY_ANOTHER_PROCESS)

    def check_finite(self, carry: dict[str, Any]) -> None:
        """Raises Diverged if the host values of the loop's carry recorded a non-finite loss."""
        step = int(carry["watch"]["bad_step"])
        if step:
            epoch, batch = divmod(step - 1, self._steps_per_epoch)
            raise Diverged(
                f"the training loss is {float(carry['watch']['bad_loss'])} at step {step} (epoch {epoch + 1}, batch "
                f"{batch + 1}): the learning rate {self._learning_rate:g} is likely too high; start again with a "
                f"smaller --learning_rate in a new --workdir. Nothing from step {step} on was saved."
            )

