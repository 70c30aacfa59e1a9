"""The errors whose message is all the user needs: `train.py` prints each as one line, without a
traceback. They live here, below every module that raises them, so that any module can."""


class ConfigError(ValueError):
    """A configuration that cannot run; its message is meant for the user."""


class DataError(RuntimeError):
    """The data cannot be had; its message says what to do."""


class WorkdirError(RuntimeError):
    """The workdir or a checkpoint in it cannot be used; the message says why and what to do."""
