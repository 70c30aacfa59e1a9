"""JAX's persistent compilation cache, on by default, so that a second run loads NiN's compiled
steps and initializer from disk instead of compiling them again.

The folder is, first found: `--compile_cache`, $JAX_COMPILATION_CACHE_DIR, then
$XDG_CACHE_HOME/nin_jax/jax (~/.cache/nin_jax/jax). `--compile_cache off` turns the cache off.

A cache entry is compiled code that the run executes, so the folder is trusted as ssh trusts its
keys: it must belong to the user and be writable by no one else (a new one is made 0700), or the
run is refused. Whoever can write there anyway (the user, root) can as well change the installed
code itself; an entry that another user wrote (planted before the folder was made private) is
dropped. JAX's own file cache writes an entry in place, so a full disk or a crash leaves an empty
or torn one that it then warns about on every run; `EntryFiles` writes them whole, and drops a
damaged one with a line, once.
"""

import contextlib
import os
import stat
import tempfile
from typing import Optional

import jax
from jax._src import compilation_cache as jax_compilation_cache  # the cache object that JAX reads and writes

from nin_jax.runtime import commands, files
from nin_jax.runtime.errors import OutputError
from nin_jax.config import ConfigError

OFF = "off"
# Compiles shorter than this are not worth a file. JAX's default, 1 s, would leave out NiN's steps
# on a fast accelerator, where they compile in under a second and start-up matters most.
MIN_COMPILE_SECONDS = 0.05
# How JAX names the file of the entry under `key`.
ENTRY_SUFFIX = "-cache"


def default_folder() -> str:
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "nin_jax", "jax")


def folder(setting: Optional[str]) -> Optional[str]:
    """The cache folder that `--compile_cache setting` names; None when it is off."""
    if setting == OFF:
        return None
    if setting:
        return os.path.expanduser(setting)
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_folder()


def open_folder(path: str, setting: Optional[str]) -> Optional[int]:
    """The cache folder, created 0700 if need be, opened once it is known to be the user's alone:
    the cache then works on the folder it checked, whatever is renamed into its place later.

    Raises ConfigError for a folder of another user or one that others can write, and for one that
    the flag names and that cannot be created; returns None, having said so in one line, for one
    that cannot be written (a read-only disk): the run goes on without a cache. Where the default
    folder cannot be created (a read-only home), the run goes on without one, silently.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        if setting:
            raise ConfigError(f"--compile_cache {setting} cannot be created ({error.strerror}); "
                              f"name another folder, or pass --compile_cache {OFF}") from error
        return None
    status = os.fstat(fd)
    risk = "who could plant compiled code there that this run would execute"
    if status.st_uid != os.geteuid():
        os.close(fd)
        raise ConfigError(f"the compile cache {path} belongs to another user (uid {status.st_uid}), {risk}; "
                          f"name a folder of your own with --compile_cache, or pass --compile_cache {OFF}")
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise ConfigError(f"the compile cache {path} can be written by other users (mode "
                          f"{stat.S_IMODE(status.st_mode) & 0o777:o}), {risk}; chmod 700 {path}, or name another "
                          f"folder with --compile_cache, or pass --compile_cache {OFF}")
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        os.close(fd)
        commands.warn(f"the compile cache {path} cannot be written ({error.strerror}); this run goes on without it")
        return None
    return fd


def enable(setting: Optional[str]) -> Optional[str]:
    """Points JAX at the cache folder (see `open_folder`) and returns it, or turns the cache off and
    returns None. Call it before the first compile: JAX opens its cache then."""
    path = folder(setting)
    fd = open_folder(path, setting) if path else None
    jax_compilation_cache.reset_cache()
    if fd is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    # XLA's own caches beside the programs stay at JAX's default (`jax_persistent_cache_enable_xla_caches`):
    # "all" had no measured gain here and stale entries upstream (docs/performance.md).
    jax_compilation_cache._cache = EntryFiles(path, fd)
    return path


class EntryFiles:
    """JAX's cache laid out as JAX lays it out, a file `<key>-cache` per compiled program, in the open
    folder `fd`. An entry is written to a temporary name and renamed into place, so it is whole or
    absent; one that is damaged (it does not decompress), is not a plain file or that another user
    wrote is dropped when read, and compiled anew. Each kind of trouble is said in one line, once
    per run; after a failed write, the run writes no more entries. JAX's size limit
    (`jax_compilation_cache_max_size`) is not applied: the folder holds NiN's few programs."""

    def __init__(self, path: str, fd: int):
        self._path, self._fd = path, fd
        self._said: set[str] = set()
        self._writable = True

    def _say_once(self, trouble: str, message: str) -> None:
        if trouble not in self._said:
            self._said.add(trouble)
            commands.warn(message)

    def _drop(self, name: str, trouble: str, detail: str = "") -> None:
        with contextlib.suppress(OSError):  # if it stays, the next run drops it
            os.unlink(name, dir_fd=self._fd)
        self._say_once(trouble, f"the compile cache {self._path} held {trouble}: {name}{detail}; dropped it and "
                                f"compiled anew, as any other such entry of this run")

    def get(self, key: str) -> Optional[bytes]:
        name = key + ENTRY_SUFFIX
        try:  # O_NONBLOCK: a pipe put there would otherwise wait for a writer
            entry = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self._fd)
        except FileNotFoundError:
            return None
        except OSError as error:  # a link (O_NOFOLLOW), no permission
            self._drop(name, "an entry it cannot read", f" ({error.strerror})")
            return None
        with open(entry, "rb") as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode):
                self._drop(name, "an entry that is not a plain file")
                return None
            if status.st_uid != os.geteuid():
                self._drop(name, f"an entry of another user (uid {status.st_uid})")
                return None
            value = file.read()
        try:
            jax_compilation_cache.decompress_executable(value)
        except Exception as error:  # zlib's or zstandard's own kinds
            self._drop(name, "a damaged entry", f" ({type(error).__name__}: {error})")
            return None
        return value

    def put(self, key: str, value: bytes) -> None:
        if not self._writable:
            return
        try:
            with files.replace(key + ENTRY_SUFFIX, "wb", dir_fd=self._fd) as file:
                file.write(value)
        except OutputError as error:
            self._writable = False
            reason = getattr(error.__cause__, "strerror", None) or error
            commands.warn(f"cannot write to the compile cache {self._path} ({reason}); this run stores no more "
                       f"compiled programs there")
