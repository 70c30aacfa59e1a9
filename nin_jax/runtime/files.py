"""Every file the project writes is written whole or not at all, and a file it cannot write says so
in one line.

`replace(path)` writes to a temporary name in the same folder, flushes it to the disk, then renames
it over `path`: a reader, a crash or a full disk leaves the old file or the whole new one, never a
part. The new file gets the mode that open() would give it under the user's umask, and a link
planted at `path` is replaced, never written through. A failure to write raises `OutputError`
naming the file and the system's reason.

Only regular files are replaced or read: a FIFO, socket, device node or folder where the project
expects a file is refused in one line (`NotRegularFile`), never opened (opening a FIFO blocks until
someone writes to it) nor replaced (`--out /dev/null` as root would replace the system's
/dev/null). A folder that the project makes or reuses inside a place the user named is never
followed through a link that leads out of it (`own_folder`).
"""

import contextlib
import errno
import os
import secrets
import stat
import tempfile
from typing import IO, Iterator, Optional

from nin_jax.runtime.errors import OutputError


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"))


def kind(mode: int) -> str:
    """'a FIFO', 'a directory', ..., 'a regular file': what a stat's `st_mode` is, in words."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file")


class NotRegularFile(OSError):
    """Something other than a regular file where the project reads or writes one; its strerror is
    the system's style, 'Is a FIFO, not a regular file' ('Is a directory' for a folder)."""

    def __init__(self, path: str, mode: int):
        if stat.S_ISDIR(mode):
            super().__init__(errno.EISDIR, os.strerror(errno.EISDIR), path)
        else:
            super().__init__(errno.EINVAL, f"Is {kind(mode)}, not a regular file", path)


def check_regular(path: str, follow_symlinks: bool = True, dir_fd: Optional[int] = None) -> None:
    """Raises `NotRegularFile` when something other than a regular file is at `path` (a link counts
    as itself where `follow_symlinks` is False: a writer replaces it); nothing is opened. A missing
    `path` passes: the caller's open or write says so."""
    try:
        mode = os.stat(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode) and not stat.S_ISLNK(mode):
        raise NotRegularFile(path, mode)


def open_regular(path: str, mode: str = "rb") -> IO:
    """`path` open for reading, refused with `NotRegularFile` unless it is a regular file. Opened
    without blocking and checked again once open, so that a FIFO put there meanwhile blocks no one."""
    check_regular(path)
    handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    status = os.fstat(handle)
    if not stat.S_ISREG(status.st_mode):
        os.close(handle)
        raise NotRegularFile(path, status.st_mode)
    os.set_blocking(handle, True)
    return os.fdopen(handle, mode)


def own_folder(parent: str, *names: str) -> str:
    """`parent/names...`, each folder (`parent` too) made where it is missing; raises OSError,
    naming the first one that is a link leading out of `parent` (a folder elsewhere would be
    written through it), or that is not a folder."""
    os.makedirs(parent, exist_ok=True)
    root = os.path.realpath(parent)
    path = parent
    for name in names:
        path = os.path.join(path, name)
        real = os.path.realpath(path)
        if os.path.islink(path) and os.path.commonpath([root, real]) != root:
            raise OSError(errno.EPERM, f"Is a link that leads outside {parent} (to {real}), which nin_jax never "
                                       f"writes through", path)
        os.makedirs(path, exist_ok=True)
    return path


def _reason(error: OSError) -> str:
    """'No space left on device', 'Read-only file system': the system's reason, without the errno."""
    return error.strerror or str(error)


@contextlib.contextmanager
def replace(path: str, mode: str = "w", dir_fd: Optional[int] = None) -> Iterator[IO]:
    """A file open for writing (text `w` or binary `wb`) that becomes `path` when the block ends
    without an error; otherwise `path` is left as it was and the temporary file is removed. It gets
    the mode that open() gives a new file, 0o666 less the umask. With `dir_fd`, an open folder,
    `path` is a name in it."""
    _refuse_special(path, dir_fd)
    folder = os.path.dirname(path if dir_fd is not None else os.path.abspath(path))
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {_reason(error)}") from error
    try:
        with os.fdopen(handle, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        _refuse_special(path, dir_fd)  # put there while the file was written
        os.replace(temporary, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {_reason(error)}") from error
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed, or never written
            os.unlink(temporary, dir_fd=dir_fd)


def _refuse_special(path: str, dir_fd: Optional[int] = None) -> None:
    """Raises `OutputError` where something other than a regular file or a link stands at `path`."""
    try:
        check_regular(path, follow_symlinks=False, dir_fd=dir_fd)
    except NotRegularFile as error:
        raise OutputError(f"cannot write {path}: {error.strerror}") from None


def check_writable(path: str) -> None:
    """Raises `OutputError` now if `path` cannot be written: before minutes of work that end in writing it."""
    if os.path.isdir(path):
        raise OutputError(f"cannot write {path}: Is a directory")
    _refuse_special(path)
    try:
        tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))).close()
    except OSError as error:
        raise OutputError(f"cannot write {path}: {_reason(error)}") from error


def write_text(path: str, text: str) -> None:
    with replace(path) as file:
        file.write(text)
