"""Why a run stops before its last epoch, and what it tells the user then.

A first Ctrl-C (SIGINT) or SIGTERM asks the training loop to stop after the current step and save
a checkpoint; a second one acts as it always does. With several processes, all of them stop after
the same step, whichever of them the signal reached (`StopAgreement`). A non-finite training loss
stops the run without saving the bad state (`check_losses`, which raises `Diverged`).
"""

import contextlib
import signal
import threading
from typing import Iterator, Optional

from nin_jax import steps

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped at a signal's request, after saving a checkpoint; `exit_code` is the
    process's exit status (see `StopAgreement.interrupted`)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """Set by the first stop signal; the loop reads it between steps."""

    signum: Optional[int] = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Within the block, the first SIGINT or SIGTERM only sets the yielded request. Signal handlers
    can only be installed from the main thread; elsewhere signals keep their usual effect."""
    request = StopRequest()
    previous = {}

    def request_stop(signum, frame):
        request.signum = signum
        for other, handler in previous.items():
            signal.signal(other, handler)  # a second signal stops the run the usual way

    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, request_stop) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# The exit status of a process that stopped because another process was asked to: sysexits.h's
# EX_TEMPFAIL, "a temporary failure; the user is invited to retry".
STOPPED_BY_ANOTHER_PROCESS = 75


class StopAgreement:
    """When every process of a run stops: after the same step, whichever of them the signal reached.

    Each process votes with every step it dispatches (its own `StopRequest`), and the steps sum
    the votes of all processes on the devices (`steps.summing_train_step`). Every process reads
    the sum from the same step's outputs, so all see a vote at the same step. A single process
    needs no agreement: its own request decides at once.
    """

    def __init__(self, request: StopRequest, num_processes: int):
        self.request = request
        self.alone = num_processes == 1

    @property
    def vote(self) -> bool:
        return self.request.signum is not None

    def agreed(self, stop_votes) -> bool:
        """Whether to stop, given the summed votes of a finished step (None: none read this step)."""
        if self.alone:
            return self.vote
        return stop_votes is not None and float(stop_votes) > 0

    def interrupted(self, step: int, resume: str) -> Interrupted:
        """The exception that ends this process: 128 + the signal's number where the signal
        arrived, `STOPPED_BY_ANOTHER_PROCESS` elsewhere."""
        if self.vote:
            return Interrupted(f"stopped by {self.request.name} after step {step}: {resume}", 128 + self.request.signum)
        return Interrupted(f"stopped after step {step} because another process of this run was asked to stop "
                           f"(SIGINT or SIGTERM): {resume}", STOPPED_BY_ANOTHER_PROCESS)


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; its message names the step."""


def check_losses(carry: steps.Metrics, steps_per_epoch: int, learning_rate: float) -> None:
    """Raises Diverged if the host values of the loop's carry recorded a non-finite loss.

    The train step itself records the first step whose loss was not finite
    (`steps.summing_train_step`), so the loop looks only where it waits for the devices anyway:
    before a checkpoint is saved and at the end of an epoch. A bad state is thus never saved or
    evaluated, and the message still names the first bad step.
    """
    step = int(carry["bad_step"])
    if step:
        epoch, batch = divmod(step - 1, steps_per_epoch)
        raise Diverged(
            f"the training loss is {float(carry['bad_loss'])} at step {step} (epoch {epoch + 1}, batch {batch + 1}): "
            f"the learning rate {learning_rate:g} is likely too high; start again with a smaller "
            f"--learning_rate in a new --workdir. Nothing from step {step} on was saved."
        )
