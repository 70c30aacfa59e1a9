"""The errors whose message is all the user needs: `train.py` prints each as one line, without a
traceback. They live here, below every module that raises them, so that any module can."""

import logging


class ConfigError(ValueError):
    """A configuration that cannot run; its message is meant for the user."""


class DataError(RuntimeError):
    """The data cannot be had; its message says what to do."""


class WorkdirError(RuntimeError):
    """The workdir or a checkpoint in it cannot be used; the message says why and what to do."""


class OutputError(RuntimeError):
    """A file cannot be written (a full disk, a read-only folder, no permission); the message names it."""


class OutOfMemory(RuntimeError):
    """The host or a device ran out of memory; the message names the flags that set how much is needed."""


def quiet_library_logs() -> None:
    """Keeps absl's log lines (orbax and tfds write their failures there too) off the terminal: the
    entry points say what failed in their own one line."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)
