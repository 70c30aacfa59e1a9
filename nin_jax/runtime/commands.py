"""What every command (`train.py`, `python -m nin_jax.export`, ...) does at the edges of its
process, so that neither a stop signal nor a closed terminal ends it with a traceback, a crash or a
lost epoch:

* `begin()`, first thing, before the command's imports (which take seconds): a stop signal until
  the command's work starts ends the process at once with one line; a closed stdout, stderr or
  stdin is reopened on /dev/null, so that no file the command opens takes its number; and a
  stdout or stderr whose writes fail (a reader that quit, `| head -1`; a full disk, `> /dev/full`)
  costs the command only what it prints there, said once in one line on stderr where it still works.
* `stops_in_one_line(...)`: during the work of a command that has nothing to save, a stop signal
  unwinds it (what it was writing is removed) and ends it with one line and status 128 + the
  signal's number; train.py saves first, with `nin_jax.stopping`. A signal that arrives while JAX
  discovers its plugins, as its first backend starts, or while a compiled module initializes,
  unwinds the command once that is over (`stop_handler`): JAX's bare `except:` there would swallow
  it, and a module's initialization turns it into an ImportError. A stop raised where Python can
  only report it (a garbage collector's callback) is raised again at once.
* `run(main)`: the process ends with `main`'s status, without the interpreter's shutdown after a
  failure, which can crash in the JAX runtime's threads.

This module imports nothing of JAX's, so that `begin` comes before the imports it guards.
"""

import contextlib
import importlib.machinery
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterator, TextIO

from nin_jax.runtime import limits, platforms

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, a scheduler's stop, a closed terminal

# Signals this close together are one request: GNU `timeout` signals the process, then its process
# group, microseconds apart. A person who reads the first line and asks again takes longer.
SAME_REQUEST_SECONDS = 1.0


class Terminated(BaseException):
    """SIGTERM or SIGHUP where nothing watches for them (before training starts, a second one, a
    command with nothing to save), raised like the KeyboardInterrupt of a SIGINT so that the
    command can say so."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def program_name() -> str:
    """The command as its parser names it: `train.py`, or `python -m nin_jax.export` for a module run with -m."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name}"
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def warn(message: str) -> None:
    """A warning on stderr in one line, named by the command: `train.py: warning: ...`."""
    print(f"{program_name()}: warning: {message}", file=sys.stderr, flush=True)


def interrupted_line(prog: str, signum: int, note: str = "") -> str:
    """What a command stopped by `signum` says, e.g. `train.py: interrupted by SIGTERM`."""
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    return f"{prog}: interrupted{by}{f'; {note}' if note else ''}\n"


def begin() -> None:
    """A command's first call, before its other imports."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:  # closed (`>&-`): the next file opened would get its number
            _to_devnull(fd)
    sys.stdout = _Forgiving(sys.stdout or open(1, "w", closefd=False), "stdout")
    sys.stderr = _Forgiving(sys.stderr or open(2, "w", closefd=False), "stderr")
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _stop_at_once)
    sys.unraisablehook = _raise_swallowed_stop_again
    _check_environment()


def _check_environment() -> None:
    """Leaves JAX_ENABLE_X64 off, whose float64 turned the inputs of steps compiled for the run's
    --dtype into others (a TypeError after the compile), and ends at once, in one line, where
    JAX_PLATFORMS names a GPU or TPU that this machine lacks, or a limit of the process leaves JAX
    too little address space or too few threads (it would abort with a C++ stack trace)."""
    x64 = os.environ.get("JAX_ENABLE_X64", "")
    if x64.strip().lower() in ("1", "true", "t", "yes", "y", "on"):
        warn(f"JAX_ENABLE_X64={x64} is left off: nin_jax computes in its --dtype (float32 or bfloat16)")
        os.environ["JAX_ENABLE_X64"] = "0"
    refusal = platforms.lacking() or limits.too_low()
    if refusal:
        sys.stderr.write(f"{program_name()}: error: {refusal}\n")
        exit_process(1)


def _to_devnull(fd: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


def _stop_at_once(signum, frame) -> None:
    """Before the work starts there is nothing to save or remove."""
    sys.stderr.write(interrupted_line(program_name(), signum))
    sys.stderr.flush()
    os._exit(128 + signum)


class _Forgiving:
    """sys.stdout or sys.stderr, whose first failed write or flush (EPIPE, ENOSPC, EIO) points
    its file descriptor at /dev/null, so that later writes, Python's own flush at exit and the
    runtime's C++ output all go nowhere quietly, and says so on the other stream once."""

    def __init__(self, stream: TextIO, name: str):
        self._stream = stream
        self._name = name
        self._lock = threading.Lock()
        self._failed = False

    def write(self, text: str) -> int:
        self._guard(self._stream.write, text)
        if "\n" in text:  # line by line: a broken pipe shows at the line that met it, not at exit
            self._guard(self._stream.flush)
        return len(text)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def _guard(self, call: Callable, *args) -> None:
        if self._failed:
            return
        try:
            call(*args)
        except (OSError, ValueError) as error:  # ValueError: the stream was closed
            self._fail(error)

    def _fail(self, error: Exception) -> None:
        with self._lock:
            if self._failed:
                return
            self._failed = True
        with contextlib.suppress(OSError, ValueError):
            _to_devnull(self._stream.fileno())
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()  # what was pending goes to /dev/null now
        reason = getattr(error, "strerror", None) or str(error)
        other = sys.stderr if self._name == "stdout" else None
        if other is not None:
            other.write(f"{program_name()}: warning: cannot write to {self._name} ({reason}); going on without it\n")

    def __getattr__(self, name: str):  # isatty, fileno, encoding, buffer, ...: the stream's own
        return getattr(self._stream, name)


def stop_handler() -> Callable:
    """A new signal handler that raises KeyboardInterrupt (SIGINT) or `Terminated` so that the
    command unwinds: once per request (`SAME_REQUEST_SECONDS`), and never inside code that would
    lose it (`_loses_a_stop`), but as soon as that is over; raised again where Python swallowed it
    (`_raise_swallowed_stop_again`)."""
    state = {"raised_at": float("-inf"), "held": None, "waiting": False}

    def handle(signum, frame):
        if signum in _swallowed:
            _swallowed.remove(signum)
        elif time.monotonic() - state["raised_at"] < SAME_REQUEST_SECONDS:
            return
        if _loses_a_stop(frame):
            state["held"] = state["held"] or signum
            if not state["waiting"]:
                state["waiting"] = True
                threading.Thread(target=_again_once_it_is_safe, args=(state,), daemon=True).start()
            return
        signum, state["held"], state["raised_at"] = state["held"] or signum, None, time.monotonic()
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    return handle


_swallowed: list[int] = []  # the stops that Python swallowed or that were held, each to be raised once more


def _raise_swallowed_stop_again(report, report_others=sys.unraisablehook) -> None:
    """Python only reports an exception raised where it cannot propagate (a garbage collector's
    callback, which JAX registers; a `__del__`), and goes on: a stop raised there is raised again
    in the main thread, from another thread a moment later so that it lands after the callback,
    instead of being lost, and nothing is reported."""
    stop = report.exc_value
    if not isinstance(stop, (KeyboardInterrupt, Terminated)):
        report_others(report)
        return
    signum = getattr(stop, "signum", signal.SIGINT)
    _swallowed.append(signum)
    threading.Thread(target=_signal_main_until_taken, args=(signum,), daemon=True).start()


def _signal_main_until_taken(signum: int) -> None:
    """The signal itself, which also wakes a main thread that sleeps or waits, sent again until
    the handler has taken it: Python runs handlers between its instructions, so one that lands
    just before a blocking call waits for that call to end."""
    while signum in _swallowed:
        time.sleep(0.05)  # the callback that swallowed the stop is over by then; if not, it is swallowed again
        signal.pthread_kill(threading.main_thread().ident, signum)


def _loses_a_stop(frame) -> bool:
    """Whether `frame` runs within code that would lose a stop raised there: JAX's discovery of its
    plugins (`jax._src.xla_bridge.discover_pjrt_plugins`), whose bare `except:` swallows it, or the
    initialization of a compiled module (tensorstore's imports numpy), which turns it into an
    ImportError or prints and drops it."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "discover_pjrt_plugins" and code.co_filename.endswith("xla_bridge.py"):
            return True
        if code.co_name in ("create_module", "exec_module") and isinstance(
                frame.f_locals.get("self"), importlib.machinery.ExtensionFileLoader):
            return True
        frame = frame.f_back
    return False


def _again_once_it_is_safe(state: dict) -> None:
    """Sends the stop that `stop_handler` held to the main thread again once it has left the code
    that would lose it: the signal itself, which also ends a call that blocks (a sleep, a wait)."""
    main = threading.main_thread().ident
    while _loses_a_stop(sys._current_frames().get(main)):
        time.sleep(0.01)
    state["waiting"] = False
    signum = state["held"]
    if signum is not None:  # not taken meanwhile by another signal's handler
        _swallowed.append(signum)
        _signal_main_until_taken(signum)


@contextlib.contextmanager
def stops_in_one_line(prog: str, note: str = "") -> Iterator[None]:
    """Within the block SIGINT raises KeyboardInterrupt and SIGTERM or SIGHUP `Terminated`,
    so that what the block was writing is cleaned up; then the process ends with
    `interrupted_line(prog, signum, note)` and status 128 + the signal's number."""
    caught: list[int] = []
    raise_stop = stop_handler()

    def stop(signum, frame):
        caught.append(signum)
        raise_stop(signum, frame)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        try:
            yield
        except (KeyboardInterrupt, Terminated):
            _end(prog, caught[0] if caught else signal.SIGINT, note)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _end(prog: str, signum: int, note: str = "") -> None:
    sys.stderr.write(interrupted_line(prog, signum, note))
    raise SystemExit(128 + signum)


def run(main: Callable[[], int]) -> None:
    """Runs a command's `main` as the process and ends it with main's status. Within `main`,
    Ctrl-C raises KeyboardInterrupt again, as in plain Python (`stop_handler`), and SIGTERM and
    SIGHUP keep `begin`'s answer until the command installs its own; once `main` is done,
    `begin`'s answer is back."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGINT, stop_handler())
    try:
        status = main()
    except SystemExit as end:
        status = end.code
    except KeyboardInterrupt:  # outside the blocks that answer it themselves
        sys.stderr.write(interrupted_line(program_name(), signal.SIGINT))
        status = 128 + signal.SIGINT
    except RuntimeError as error:  # JAX could not start a platform, wherever the command first used one
        line = platforms.backend_failure(error)
        if not line:
            raise
        sys.stderr.write(f"{program_name()}: error: {line}\n")
        status = 1
    if in_main_thread:
        for signum in STOP_SIGNALS:
            signal.signal(signum, _stop_at_once)
    exit_process(status)


def exit_process(status) -> None:
    """Ends the process with `status` once the command has said what it must. A command of one
    process has nothing left to do by then (its files are written and closed, its lock released),
    so it exits at once: threads that a failed save left behind (orbax's) can neither wait nor
    print at shutdown, the interpreter's shutdown after an interrupted compile can crash inside the
    runtime, and a signal during that shutdown would end the process without a word. With several
    processes the runtime's own shutdown still runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    if not _several_processes():
        os._exit(status if isinstance(status, int) else 0 if status is None else 1)
    sys.exit(status)


def _several_processes() -> bool:
    """Whether this process took part in `jax.distributed` (looked up, not imported)."""
    distributed = sys.modules.get("jax._src.distributed")
    return distributed is not None and getattr(distributed.global_state, "client", None) is not None
