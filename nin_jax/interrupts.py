"""A first Ctrl-C (SIGINT) or SIGTERM asks the training loop to stop after the current step and
save a checkpoint; a second one acts as it always does."""

import contextlib
import signal
import threading
from typing import Iterator, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped at a signal's request; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


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
