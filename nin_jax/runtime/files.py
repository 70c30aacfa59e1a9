"""Every file the project writes is written whole or not at all, and a file it cannot write says so
in one line.

`replace(path)` writes to a temporary name in the same folder, flushes it to the disk, then renames
it over `path`: a reader, a crash or a full disk leaves the old file or the whole new one, never a
part. The new file gets the mode that open() would give it under the user's umask, and a link
planted at `path` is replaced, never written through. A failure to write raises `OutputError`
naming the file and the system's reason.
"""

import contextlib
import os
import secrets
import tempfile
from typing import IO, Iterator, Optional

from nin_jax.runtime.errors import OutputError


def _reason(error: OSError) -> str:
    """'No space left on device', 'Read-only file system': the system's reason, without the errno."""
    return error.strerror or str(error)


@contextlib.contextmanager
def replace(path: str, mode: str = "w", dir_fd: Optional[int] = None) -> Iterator[IO]:
    """A file open for writing (text `w` or binary `wb`) that becomes `path` when the block ends
    without an error; otherwise `path` is left as it was and the temporary file is removed. It gets
    the mode that open() gives a new file, 0o666 less the umask. With `dir_fd`, an open folder,
    `path` is a name in it."""
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
        os.replace(temporary, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {_reason(error)}") from error
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed, or never written
            os.unlink(temporary, dir_fd=dir_fd)


def check_writable(path: str) -> None:
    """Raises `OutputError` now if `path` cannot be written: before minutes of work that end in writing it."""
    if os.path.isdir(path):
        raise OutputError(f"cannot write {path}: Is a directory")
    try:
        tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))).close()
    except OSError as error:
        raise OutputError(f"cannot write {path}: {_reason(error)}") from error


def write_text(path: str, text: str) -> None:
    with replace(path) as file:
        file.write(text)
