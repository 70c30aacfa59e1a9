"""Why a run stops before its last epoch, and what it tells the user then: a stop signal, or a
training loss that is no longer finite. This module owns both, from the step on the devices to
the message; the loop asks one `StopWatch`.

A first Ctrl-C (SIGINT), SIGTERM or SIGHUP asks the loop to stop after the current step and save
a checkpoint, and says so at once in one line; a second request stops the process at once, saying
which checkpoint is kept. Signals within `SAME_REQUEST_SECONDS` of the first one's line are that
same request: GNU `timeout` signals the process and then its process group, microseconds apart.
One before training starts stops the process at once (`KeyboardInterrupt`, `Terminated`), and the
entry point says so in one line. On a CPU at 224 px the loop waits many seconds at a time inside
JAX for the devices, where Python runs no signal handler: so the signals also wake a thread of
their own (`signal.set_wakeup_fd`), which answers at once, and ends the process itself when a
second request finds the loop still waiting.

With several processes, all of them stop after the same step, whichever of them the signal reached:
each process votes with every step it
dispatches, and the step sums the votes of all processes on the devices (`watch_step`), so every
process reads the same sum after the same step. A non-finite training loss stops the run without
saving the bad state: the step records the first bad step (`watch_step`), and the loop looks at
that record where it waits for the devices anyway, before a checkpoint is saved and at the end of
an epoch (`StopWatch.check_finite`), so the message still names the first bad step.
"""

import _thread
import collections
import contextlib
import os
import select
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from nin_jax.runtime.commands import SAME_REQUEST_SECONDS, STOP_SIGNALS, Terminated, stop_handler


# The exit status of a process that stopped because another process was asked to: sysexits.h's
# EX_TEMPFAIL, "a temporary failure; the user is invited to retry".
STOPPED_BY_ANOTHER_PROCESS = 75

# How many steps back a process reads the summed votes with several processes: a step that the
# devices have surely finished, so reading it never stalls the queue of dispatched steps. The same
# on every process (it depends on the platform only); on a CPU, whose steps take up to seconds and
# whose queue is short (`progress.IN_FLIGHT_SECONDS`), fewer, so that a stop comes within seconds.
VOTE_LAG_STEPS = {"cpu": 2}
ACCELERATOR_VOTE_LAG_STEPS = 8

# How long a second request waits for the loop to stop by itself before the process ends at once.
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
    """Calls `handle(signum)` as soon as a signal with a Python handler arrives, even while the
    main thread waits inside a computation, where Python's handler cannot run yet: the signal's C
    handler writes its number into a pipe that a thread of its own reads, and so does Python's
    handler (`read_now`), which may come first. With a number that `handle` takes for a second
    request, the thread calls `on_second(signum)`. Earlier readers of those numbers (an asyncio
    loop) still get them. Main thread only."""

    def __init__(self, handle: Callable[[int], bool], on_second: Callable[[int], None]):
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # as set_wakeup_fd requires: a full pipe never blocks a handler
        os.set_blocking(self._read, False)  # two readers: neither may wait for what the other took
        self._handle = handle
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, args=(on_second,), name="stop_signals", daemon=True)
        self._thread.start()

    def read_now(self) -> None:
        """Hands the numbers that no one has read yet to `handle`, from Python's handler."""
        with contextlib.suppress(BlockingIOError):
            self._pass_on(os.read(self._read, 64))

    def _pass_on(self, numbers: bytes) -> list[int]:
        """The numbers that `handle` took for a second request."""
        if self._previous != -1:
            with contextlib.suppress(OSError):
                os.write(self._previous, numbers)
        return [signum for signum in numbers if self._handle(signum)]

    def _run(self, on_second: Callable[[int], None]) -> None:
        while True:
            select.select([self._read], [], [])
            try:
                numbers = os.read(self._read, 64)
            except BlockingIOError:  # Python's handler read them first
                continue
            if not numbers:  # `close`
                break
            for signum in self._pass_on(numbers):
                on_second(signum)
        os.close(self._read)

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous)
        os.close(self._write)  # the thread reads the end of the pipe, and ends
        self._thread.join()


class StopWatch:
    """Within `with StopWatch(...) as watch:` the first SIGINT, SIGTERM or SIGHUP only sets a
    request, and says at once after which step the run will stop; a second request (a signal
    `SAME_REQUEST_SECONDS` or more after that line) stops the process at once.

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
        self._asked_at: Optional[float] = None  # when the first request's line was written
        self._second_signum: Optional[int] = None
        self._raised = False  # Python's handler stopped the loop where it was
        self._main_thread_stops = threading.Event()
        self._previous: dict[int, Any] = {}
        self._signal_thread: Optional[_SignalThread] = None
        self._in_flight: collections.deque = collections.deque()
        self._vote_lag = VOTE_LAG_STEPS.get(jax.default_backend(), ACCELERATOR_VOTE_LAG_STEPS)

    def __enter__(self) -> "StopWatch":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle_in_main_thread) for signum in STOP_SIGNALS}
            self._signal_thread = _SignalThread(self._signal_arrived, self._second_request)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._signal_thread:
            self._signal_thread.close()
        if isinstance(error, (KeyboardInterrupt, Terminated)) and self._raised:
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
        self._asked_at = time.monotonic()

    def _signal_arrived(self, signum: int) -> bool:
        """Whether `signum`, read as soon as it arrived, asks again: a first signal sets the
        request; one within `SAME_REQUEST_SECONDS` of its line is the same request (GNU `timeout`
        signals the process, then its group), one later a second request."""
        if signum not in STOP_SIGNALS:
            return False
        if self._signum is None:
            self._first_signal(signum)
            return False
        with self._lock:
            if self._second_signum is not None or self._asked_at is None or \
                    time.monotonic() - self._asked_at < SAME_REQUEST_SECONDS:
                return False
            self._second_signum = signum
            return True

    def _second_request(self, signum: int) -> None:
        """On the signal thread: has Python's handler stop the loop, and unless the main thread
        stops within the grace, ends the process."""
        with self._lock:
            if not self._raised:
                _thread.interrupt_main(signum)
        if not self._main_thread_stops.wait(SECOND_SIGNAL_GRACE_SECONDS):
            end = stopped_at_once(signum, self._kept)
            _say(str(end), exit_code=end.exit_code)

    def _handle_in_main_thread(self, signum, frame) -> None:
        """Python's handler, once the main thread runs Python again: a second request stops the
        loop where it is."""
        self._signal_thread.read_now()
        with self._lock:
            if self._second_signum is None or self._raised:
                return
            self._raised = True
        self._main_thread_stops.set()
        raise KeyboardInterrupt if self._second_signum == signal.SIGINT else Terminated(self._second_signum)

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

