"""The errors whose message is all the user needs: a command prints each as one line, without a
traceback (with `nin_jax.config.ConfigError`, the config's own)."""

import logging


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


def first_line(error: BaseException) -> str:
    """'ValueError: <its first line that is not blank>': what a one-line message quotes of an error."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
