"""Every file the project writes is written whole or not at all, and a file it cannot write says so
in one line.

`replace(path)` writes to a temporary name in the same folder, flushes it to the disk, then renames
it over `path`: a reader, a crash or a full disk leaves the old file or the whole new one, never a
part. A failure to write raises `OutputError` naming the file and the system's reason.
"""

import contextlib
import os
import tempfile
from typing import IO, Iterator

from nin_jax.errors import OutputError


def _reason(error: OSError) -> str:
    """'No space left on device', 'Read-only file system': the system's reason, without the errno."""
    return error.strerror or str(error)


@contextlib.contextmanager
def replace(path: str, mode: str = "w") -> Iterator[IO]:
    """A file open for writing (text `w` or binary `wb`) that becomes `path` when the block ends
    without an error; otherwise `path` is left as it was and the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as error:
        raise OutputError(f"cannot write {path}: {_reason(error)}") from error
    try:
        with os.fdopen(handle, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0o600 would hide the file from the other users of a shared folder
        os.replace(temporary, path)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {_reason(error)}") from error
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


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
