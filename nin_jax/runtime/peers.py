"""When one process of a multi-process job dies, the others end within a bounded time, each with one
line that says so and how to resume.

The JAX runtime notices a dead peer by its missed heartbeats, or at once when the coordinator's
socket closes, and then ends every other process with a multi-line fatal log and a stack trace (its
Python callback for this fails with std::bad_cast). So, in a job of several
processes:

* `PeerWatch`, a thread, beats through the runtime's key-value store and ends the process with
  one line once a peer has been silent for `--peer_timeout_seconds`: before the runtime's own
  heartbeat timeout, which is set above it as a backstop.
* `peer_failures_exit`: a collective that fails because a peer died ends the process with one
  line, without the cleanup (orbax's barriers, the runtime's shutdown barrier) that would wait for
  the dead peer.
* `route_runtime_log`: what the runtime's C++ code writes to stderr goes to a log file, and a small
  reporter process turns the runtime's fatal end (the coordinator died) into the one line.
"""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

import jax
from jax._src import distributed as jax_distributed  # the runtime's client: its key-value store

from nin_jax.runtime import commands
from nin_jax.runtime.errors import first_line

KEY_PREFIX = "nin_jax/"
EXIT_CODE = 1
_ALIVE = f"{KEY_PREFIX}alive/"
_STOPPED = "stopped"  # a heartbeat value that says "this process has ended on purpose"


def resume_advice(num_processes: int) -> str:
    return (f"the other processes of this job stop too. Run all {num_processes} processes again with the same "
            f"commands to resume from the latest checkpoint.")


_exiting = threading.Lock()
_said_fd = None  # the pipe that tells the reporter that this process has said why it ends


def exit_for_lost_peer(what_happened: str) -> None:
    """Ends this process at once with one line: the cleanup on a normal exit would wait for the dead peer."""
    if not _exiting.acquire(blocking=False):  # another thread is already saying it
        time.sleep(3600)
    sys.stderr.write(f"{commands.program_name()}: error: {what_happened}; {resume_advice(jax.process_count())}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    if _said_fd is not None:
        os.write(_said_fd, b"said")
    os._exit(EXIT_CODE)


@contextlib.contextmanager
def arrival_deadline(timeout_s: float, what_happened: str) -> Iterator[None]:
    """Ends this process with the one line `what_happened` when the block (the runtime's start,
    where every process waits for all the others) has not ended within `timeout_s`: the runtime
    would wait out its own start timeout, then abort with a C++ stack trace."""
    arrived = threading.Event()

    def watch() -> None:
        if not arrived.wait(timeout_s):
            sys.stderr.write(f"{commands.program_name()}: error: {what_happened}\n")
            sys.stderr.flush()
            os._exit(EXIT_CODE)

    threading.Thread(target=watch, name="ArrivalDeadline", daemon=True).start()
    try:
        yield
    finally:
        arrived.set()


def client():
    """The runtime's own client, whose key-value store the processes share."""
    return jax_distributed.global_state.client


class PeerWatch:
    """Beats every few seconds through the runtime's key-value store and checks that every peer
    does too; ends the process with one line when a peer stays silent for `timeout_s`, or when
    the coordinator no longer answers."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.interval_s = min(max(timeout_s / 6, 0.2), 10.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="PeerWatch", daemon=True)
        self._key = f"{_ALIVE}{jax.process_index()}"

    def start(self) -> "PeerWatch":
        import atexit

        self._thread.start()
        atexit.register(self.stop)  # runs before JAX's own shutdown, which was registered earlier
        return self

    def stop(self) -> None:
        """Stops beating and tells the peers so: a process that has ended is not a dead peer."""
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            client().key_value_set(self._key, _STOPPED, allow_overwrite=True)

    def _run(self) -> None:
        peers = [index for index in range(jax.process_count()) if index != jax.process_index()]
        last_value = {index: None for index in peers}
        last_change = {index: time.monotonic() for index in peers}
        beat = 0
        while not self._stop.wait(self.interval_s if beat else 0):
            beat += 1
            try:
                client().key_value_set(self._key, str(beat), allow_overwrite=True)
                values = dict(client().key_value_dir_get(_ALIVE))
            except Exception as error:  # the runtime raises its own kinds
                if self._stop.is_set():
                    return
                exit_for_lost_peer(f"lost contact with process 0, the coordinator of this job "
                                   f"({first_line(error)}): it has likely died")
            now = time.monotonic()
            for index in list(peers):
                value = values.get(f"{_ALIVE}{index}")
                if value == _STOPPED:
                    peers.remove(index)
                elif value != last_value[index]:
                    last_value[index], last_change[index] = value, now
                elif now - last_change[index] > self.timeout_s:
                    exit_for_lost_peer(f"process {index} of this job has not been heard from for "
                                       f"{self.timeout_s:g} s (--peer_timeout_seconds): it has likely died")


@contextlib.contextmanager
def peer_failures_exit() -> Iterator[None]:
    """With several processes, a failed collective (a peer died inside it, and the transport saw its
    connection close) ends this process with one line, before any cleanup waits for that peer."""
    try:
        yield
    except jax.errors.JaxRuntimeError as error:
        if jax.process_count() == 1:
            raise
        exit_for_lost_peer(f"an operation across the processes failed ({first_line(error)}): "
                           f"another process of this job has likely died")




# The reporter: a separate, small Python process, since the one whose end it reports is gone by
# then. It waits for the pipe from that process to close, and when that process has not said why
# it ended but the runtime's log shows the runtime's fatal end, it says so in one line.
_REPORTER = r"""
import os, sys
pipe, log_path, prog, advice = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
said = b""
while chunk := os.read(pipe, 64):
    said += chunk
with open(log_path, errors="replace") as log:
    text = log.read()
fatal = ("Terminating process because the JAX distributed service" in text  # the coordination service is gone
         or "terminate called after throwing" in text)  # a collective's transport failed outside Python
if not text:
    os.remove(log_path)  # nothing to keep
    os.rmdir(os.path.dirname(log_path))
elif fatal and not said:
    sys.stderr.write(f"{prog}: error: the JAX runtime ended this process after losing another process of this job "
                     f"or its coordinator (process 0), which has likely died; {advice} The runtime's log: {log_path}\n")
"""


def route_runtime_log(num_processes: int) -> str:
    """Sends what C++ code writes to stderr into a log file, keeps Python's `sys.stderr` on the
    terminal, and starts the reporter; returns the log's path. The log lies in a folder of its own
    that only this user can enter (`mkdtemp`): a name that others can guess, in a folder they can
    write, is one they could plant a link at."""
    path = os.path.join(tempfile.mkdtemp(prefix=f"nin_jax_runtime_{socket.gethostname()}_"), "runtime.log")
    global _said_fd
    sys.stderr.flush()
    terminal = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stderr = os.fdopen(terminal, "w", buffering=1)
    read_end, _said_fd = os.pipe()
    subprocess.Popen(
        [sys.executable, "-c", _REPORTER, str(read_end), path, commands.program_name(), resume_advice(num_processes)],
        pass_fds=(read_end,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal,
        start_new_session=True,  # a Ctrl-C to the job's process group is not for it
    )
    os.close(read_end)
    return path
