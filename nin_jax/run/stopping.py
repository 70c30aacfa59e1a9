"""Why a run stops before its last epoch, and what it tells the user then: a stop signal, or a
training loss that is no longer finite. This module owns both, from the step on the devices to
the message; the loop asks one `StopWatch`.

A first Ctrl-C (SIGINT), SIGTERM or SIGHUP asks the loop to stop after the current step and save
a checkpoint, and says so at once in one line; a second one stops the process at once, saying
which checkpoint is kept. One before training starts stops the process at once
(`KeyboardInterrupt`, `Terminated`), and the entry point says so in one line. On a CPU at 224 px
the loop waits many seconds at a time inside JAX for the devices, where Python runs no signal
handler: so the signals also wake a thread of their own (`signal.set_wakeup_fd`), which answers
at once, and ends the process itself when a second signal finds the loop still waiting.

With several processes, all of them stop after the same step, whichever of them the signal reached:
each process votes with every step it
dispatches, and the step sums the votes of all processes on the devices (`watch_step`), so every
process reads the same sum after the same step. A non-finite training loss stops the run without
saving the bad state: the step records the first bad step (`watch_step`), and the loop looks at
that record where it waits for the devices anyway, before a checkpoint is saved and at the end of
an epoch (`StopWatch.check_finite`), so the message still names the first bad step.
"""

import collections
import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from nin_jax.runtime.commands import STOP_SIGNALS, Terminated, stop_handler


# The exit status of a process that stopped because another process was asked to: sysexits.h's
# EX_TEMPFAIL, "a temporary failure; the user is invited to retry".
STOPPED_BY_ANOTHER_PROCESS = 75

# How many steps back a process reads the summed votes with several processes: a step that the
# devices have surely finished, so reading it never stalls the queue of dispatched steps. The same
# on every process (it depends on the platform only); on a CPU, whose steps take up to seconds and
# whose queue is short (`progress.IN_FLIGHT_SECONDS`), fewer, so that a stop comes within seconds.
VOTE_LAG_STEPS = {"cpu": 2}
ACCELERATOR_VOTE_LAG_STEPS = 8

# How long a second signal waits for the loop to stop by itself before the process ends at once.
SECOND_SIGNAL_GRACE_SECONDS = 1.0


class Interrupted(Exception):
    """The run stopped at a signal's request, after saving a checkpoint; `exit_code` is the
    process's exit status: 128 + the signal's number where the signal arrived,
    `STOPPED_BY_ANOTHER_PROCESS` elsewhere."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StoppedAtOnce(BaseException):
    """A second signal stopped the loop where it was. `train_and_evaluate` turns it into
    `Interrupted` once its checkpoints are closed, saying which one is kept (`stopped_at_once`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stopped_at_once(signum: int, kept: Optional[Callable[[], str]]) -> Interrupted:
    """The end of a process that a second `signum` stopped; `kept` says which checkpoint is kept
    (None: the run saves none)."""
    return Interrupted(f"stopped at once by a second {signal.Signals(signum).name}: "
                       f"{kept() if kept else 'nothing was saved (no --workdir)'}", 128 + signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block SIGTERM and SIGHUP raise `Terminated` (`commands.stop_handler`) instead of
    ending the process without a word (from the main thread only, where handlers can be installed)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        terminate = stop_handler()
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

def _say(line: str, exit_code: Optional[int] = None) -> None:
    """Writes `line` to stderr on a line of its own, above any progress bar; with `exit_code`, then
    ends the process at once, before the bars are drawn again."""
    with tqdm.tqdm.external_write_mode(file=sys.stderr):
        sys.stderr.write(f"{os.path.basename(sys.argv[0])}: {line}\n")
        sys.stderr.flush()
        if exit_code is not None:
            sys.stdout.flush()
            os._exit(exit_code)


class _SignalThread:
    """Calls `handle(signum)` on a thread of its own as soon as a signal with a Python handler
    arrives, even while the main thread waits inside a computation, where Python's handler cannot
    run yet: the signal's C handler writes its number into a pipe that this thread reads. Earlier
    readers of those numbers (an asyncio loop) still get them. Main thread only."""

    def __init__(self, handle: Callable[[int], None]):
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # as set_wakeup_fd requires: a full pipe never blocks a handler
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, args=(handle,), name="stop_signals", daemon=True)
        self._thread.start()

    def _run(self, handle: Callable[[int], None]) -> None:
        while numbers := os.read(self._read, 64):
            if self._previous != -1:
                with contextlib.suppress(OSError):
                    os.write(self._previous, numbers)
            for signum in numbers:
                handle(signum)
        os.close(self._read)

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous)
        os.close(self._write)  # the thread reads the end of the pipe, and ends
        self._thread.join()


class StopWatch:
    """Within `with StopWatch(...) as watch:` the first SIGINT, SIGTERM or SIGHUP only sets a
    request, and says at once after which step the run will stop; a second one stops the process
    at once.

    Per step the loop hands `watch.vote` to the train step and asks `watch.agreed(carry, step)` (at
    an epoch's end `agreed_after_epoch`) whether to stop now; it saves, then raises
    `watch.interrupted(step)`. Before it saves or evaluates it passes the host values of its carry
    to `watch.check_finite`, which raises `Diverged`. `kept()` says which checkpoint a process
    stopped at once leaves (None: the run saves none). Signal handlers can only be installed from
    the main thread; elsewhere signals keep their usual effect.
    """

    def __init__(self, num_processes: int, steps_per_epoch: int, learning_rate: float, resume: str,
                 kept: Optional[Callable[[], str]], first_step: int, last_step: int,
                 fetch: Callable[[Any], Any] = jax.device_get):
        self._alone = num_processes == 1
        self._steps_per_epoch = steps_per_epoch
        self._learning_rate = learning_rate
        self._resume = resume
        self._kept = kept
        self._last_step = last_step
        self._fetch = fetch
        self._lock = threading.RLock()  # Python's handler may run while the main thread holds it
        self._checked = first_step  # the last step after which the loop decided to go on
        self._stop_after: Optional[int] = None  # with one process: the step the loop stops after
        self._signum: Optional[int] = None
        self._second_signum = signal.SIGINT
        self._signals_seen = 0  # by the signal thread, at once
        self._signals_handled = 0  # by Python's handler, once the main thread runs Python
        self._main_thread_stops = threading.Event()
        self._previous: dict[int, Any] = {}
        self._signal_thread: Optional[_SignalThread] = None
        self._in_flight: collections.deque = collections.deque()
        self._vote_lag = VOTE_LAG_STEPS.get(jax.default_backend(), ACCELERATOR_VOTE_LAG_STEPS)

    def __enter__(self) -> "StopWatch":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle_in_main_thread) for signum in STOP_SIGNALS}
            self._signal_thread = _SignalThread(self._signal_arrived)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._signal_thread:
            self._signal_thread.close()
        if isinstance(error, (KeyboardInterrupt, Terminated)) and self._signals_handled >= 2:
            raise StoppedAtOnce(self._second_signum) from None

    def _first_signal(self, signum: int) -> None:
        """Sets the request and says so, once: from whichever of the signal thread and Python's
        handler sees the first signal first."""
        with self._lock:
            if self._signum is not None:
                return
            self._signum = signum
            self._stop_after = min(self._checked + 1, self._last_step)
            line = self._stopping_line(signum)
        _say(line)  # outside the lock: tqdm's own lock may be held by the thread that waits for ours

    def _signal_arrived(self, signum: int) -> None:
        """On the signal thread, at once."""
        if signum not in STOP_SIGNALS:
            return
        self._signals_seen += 1
        if self._signals_seen == 1:
            self._first_signal(signum)
        elif self._signals_seen == 2:  # unless the main thread stops within the grace, end the process
            self._second_signum = signum
            if not self._main_thread_stops.wait(SECOND_SIGNAL_GRACE_SECONDS):
                end = stopped_at_once(signum, self._kept)
                _say(str(end), exit_code=end.exit_code)

    def _handle_in_main_thread(self, signum, frame) -> None:
        """Python's handler, once the main thread runs Python again: a second signal stops the loop
        where it is."""
        self._signals_handled += 1
        self._first_signal(signum)
        if self._signals_handled >= 2:
            self._second_signum = signum
            self._main_thread_stops.set()
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    def _stopping_line(self, signum: int) -> str:
        after = (f"after step {self._stop_after}" if self._alone else
                 f"with the other processes after the same step, at most {self._vote_lag + 2} steps from now")
        then = "then saving" if self._kept else "then ending (no --workdir: nothing is saved)"
        again = ("press Ctrl-C again" if signum == signal.SIGINT else f"send {signal.Signals(signum).name} again")
        return (f"stopping {after} ({signal.Signals(signum).name}), {then}; {again} to stop now"
                f"{' without saving this step' if self._kept else ''}")

    @property
    def vote(self) -> bool:
        """This process's vote to stop: whether a signal asked it to."""
        return self._signum is not None

    def agreed(self, carry: dict[str, Any], step: int) -> bool:
        """Whether every process stops after `step`, whose step made `carry` (on the devices). One
        process decides at once; several read the summed votes of the step `VOTE_LAG_STEPS` back,
        which every process reads at the same step. At an epoch's end the loop asks
        `agreed_after_epoch` instead."""
        with self._lock:
            if step % self._steps_per_epoch:
                self._checked = step
            asked = self._stop_after is not None and step >= self._stop_after
        if self._alone:
            return asked
        self._in_flight.append(carry["watch"]["stop_votes"])
        if len(self._in_flight) <= self._vote_lag:
            return False
        return float(self._fetch(self._in_flight.popleft())) > 0

    def agreed_after_epoch(self, carry: dict[str, Any], step: int) -> bool:
        """`agreed` at an epoch's end, from the host values of its carry: every step is done."""
        with self._lock:
            self._checked = step
            asked = self._stop_after is not None and step >= self._stop_after
        self._in_flight.clear()
        return asked if self._alone else float(carry["watch"]["stop_votes"]) > 0

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

