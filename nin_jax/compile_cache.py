"""JAX's persistent compilation cache, on by default, so that a second run loads NiN's compiled
steps and initializer from disk instead of compiling them again.

The folder is, first found: `--compile_cache`, $JAX_COMPILATION_CACHE_DIR, then
$XDG_CACHE_HOME/nin_jax/jax (~/.cache/nin_jax/jax). `--compile_cache off` turns the cache off.

A cache entry is compiled code that the run executes, so the folder is trusted as ssh trusts its
keys: it must belong to the user and be writable by no one else (a new one is made 0700), or the
run is refused. Whoever can write there anyway (the user, root) can as well change the installed
code itself.
"""

import os
import stat
import tempfile
from typing import Optional

import jax

from nin_jax import locks
from nin_jax.errors import ConfigError

OFF = "off"
# Compiles shorter than this are not worth a file. JAX's default, 1 s, would leave out NiN's steps
# on a fast accelerator, where they compile in under a second and start-up matters most.
MIN_COMPILE_SECONDS = 0.05


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
    """The cache folder, created 0700 if need be, opened once it is known to be the user's alone.

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
        locks.warn(f"the compile cache {path} cannot be written ({error.strerror}); this run goes on without it")
        return None
    return fd


def enable(setting: Optional[str]) -> Optional[str]:
    """Points JAX at the cache folder (see `open_folder`) and returns it, or turns the cache off and
    returns None. Call it before the first compile: JAX opens its cache then."""
    path = folder(setting)
    fd = open_folder(path, setting) if path else None
    if fd is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    os.close(fd)
    return path
