"""JAX's persistent compilation cache, on by default, so that a second run loads NiN's compiled
steps and initializer from disk instead of compiling them again.

The folder is, first found: `--compile_cache`, $JAX_COMPILATION_CACHE_DIR, then
$XDG_CACHE_HOME/nin_jax/jax (~/.cache/nin_jax/jax). `--compile_cache off` turns the cache off.
JAX treats the folder as trusted code: do not share it with people you do not trust.
"""

import os
from typing import Optional

import jax

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


def enable(setting: Optional[str]) -> Optional[str]:
    """Points JAX at the cache folder (created if need be) and returns it, or turns the cache off
    and returns None. Call it before the first compile: JAX opens its cache then.

    A folder named by the flag that cannot be created is a ConfigError; where the default one
    cannot (a read-only home), the run goes on without a cache.
    """
    path = folder(setting)
    if path:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as error:
            if setting:
                raise ConfigError(f"--compile_cache {setting} cannot be created ({error.strerror}); "
                                  f"name another folder, or pass --compile_cache {OFF}") from error
            path = None
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
