"""Locks that the operating system drops together with the process holding them (`fcntl.flock` on a
file), so that a run killed with SIGKILL or a machine that lost power never blocks the next one.

Two uses: one run per workdir (`workdir_lock`), and one build per tfds data directory (see
`dataset.load_fashion_mnist`). The lock file holds the host and pid of its holder, so that
whoever finds it taken can say by whom; a holder that ends removes it.
"""

import contextlib
import errno
import os
import re
import socket
import stat
from typing import Callable, Iterator, Optional

from nin_jax.runtime import commands, distributed
from nin_jax.runtime.errors import WorkdirError

WORKDIR_LOCK = "run.lock"


# What flock raises on filesystems without locks (some FUSE mounts, Lustre without -o flock).
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class Unsupported(OSError):
    """The filesystem of the lock file has no locks."""


class Locked(RuntimeError):
    """Another live process holds the lock: a nin_jax run (`by_run`), or another program."""

    def __init__(self, path: str, holder: str, by_run: bool = True):
        super().__init__(f"{path} is locked by {holder}")
        self.path, self.holder, self.by_run = path, holder, by_run


def _holder(fd: int, path: str) -> tuple[str, bool]:
    """Who holds the lock on `fd`, in words, and whether it is a nin_jax run: the host and pid the
    holder wrote; unless that pid, on this host, has ended: then another program took the lock on
    the file a killed run left (`flock W/run.lock ...`), and /proc/locks may name it."""
    written = os.pread(fd, 256, 0).decode(errors="replace").strip()
    named = re.fullmatch(r"pid (\d+) on host (\S+)", written)
    if not named or named.group(2) != socket.gethostname() or _alive(int(named.group(1))):
        return written or "a process that has not yet written its host and pid", True
    pid = _flock_holder(fd)
    return (f"{f'pid {pid}, which' if pid else 'it'} is not a nin_jax run: {path} still names {written}, a run that "
            f"has ended"), False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        pass
    return True


def _flock_holder(fd: int) -> Optional[int]:
    """The pid that /proc/locks gives for the lock on `fd`'s file (Linux), or None."""
    status = os.fstat(fd)
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    try:
        with open("/proc/locks") as table:
            for line in table:
                fields = line.split()
                if "FLOCK" in fields and device in fields and fields.index(device) > 0:
                    return int(fields[fields.index(device) - 1])
    except (OSError, ValueError):
        pass
    return None


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)


def _open_own_file(path: str) -> int:
    """`path` opened for reading and writing, created if missing (with the mode open() gives it under
    the umask), refused when it is a symbolic link or has other names (a hard link): a link planted
    there would have the holder's line written into a file outside the folder."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        if error.errno != errno.ELOOP:  # what O_NOFOLLOW gives for a symbolic link
            raise
    else:
        status = os.fstat(fd)
        if stat.S_ISREG(status.st_mode) and status.st_nlink == 1:
            return fd
        os.close(fd)
    raise OSError(errno.EPERM, f"{path} is a link or not a plain file, which nin_jax never writes to; remove it", path)


@contextlib.contextmanager
def exclusive(path: str, wait: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Holds an exclusive lock on `path` (created when missing) for the block, and removes the file
    as the block ends, still holding it. When another process holds it: raises `Locked`, or with
    `wait`, calls `wait(holder)` once and waits for the lock. A lock that is taken changes nothing
    in the file; the holder writes its name into it."""
    fd = _lock(path, wait)
    try:
        _write_holder(fd)
        yield
    finally:
        with contextlib.suppress(OSError):  # another process may have removed it after a crash of ours
            if _is_at(fd, path):
                os.unlink(path)
        os.close(fd)  # and with it the lock


def _is_at(fd: int, path: str) -> bool:
    """Whether `path` is still the file open as `fd`: a holder that ended removed the one a waiting
    process had opened, and a lock on a removed file locks out no one."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


def _lock(path: str, wait: Optional[Callable[[str], None]]) -> int:
    """`path` opened and locked, as a file that is still at `path` once the lock is held."""
    import fcntl  # POSIX only, like the multi-process runtime itself

    waited = False
    while True:
        fd = _open_own_file(path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait is None:
                    raise Locked(path, *_holder(fd, path)) from None
                if not waited:
                    wait(_holder(fd, path)[0])
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:
            os.close(fd)
            if error.errno in _NO_LOCKS:
                raise Unsupported(error.errno, f"{error.strerror}: its filesystem has no locks", path) from None
            raise
        except BaseException:
            os.close(fd)
            raise
        if _is_at(fd, path):
            return fd
        os.close(fd)  # removed by the holder that ended: lock the file there now


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """One run per workdir: process 0 holds `<workdir>/run.lock` for the run, before anything is
    written there; with several processes, all of them learn its outcome through the runtime and
    refuse together, so none waits for a peer that has left."""
    with contextlib.ExitStack() as stack:
        refusal = ""
        if distributed.is_main_process():
            try:
                os.makedirs(workdir, exist_ok=True)
                stack.enter_context(exclusive(os.path.join(workdir, WORKDIR_LOCK)))
            except Unsupported as error:
                commands.warn(f"cannot lock --workdir {workdir} ({error.strerror}); nothing keeps a second run out of it")
            except Locked as locked:
                refusal = (f"--workdir {workdir} is in use by another {'run' if locked.by_run else 'program'} "
                           f"({locked.holder}); wait for it to end, or use another --workdir")
            except OSError as error:
                refusal = f"cannot write to --workdir {workdir}: {error.strerror or error}"
        refusal = distributed.from_process_0("workdir_lock", refusal)
        if refusal:
            raise WorkdirError(refusal)
        yield
