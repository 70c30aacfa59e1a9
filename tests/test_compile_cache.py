"""The persistent compilation cache: on by default, where the flag or the environment says, or off;
a folder only its user can write, whose entries are whole and that a full or read-only disk, a
damaged entry or one planted by another user never turns into warnings on every run."""

import os
import stat
import subprocess
import sys

import pytest

from nin_jax import compile_cache
from nin_jax.config import ConfigError

from conftest import REPO_ROOT
from test_benchmarks import random_arrays, run_script
from test_faults import mounted_tmpfs
from test_train import run_cli

NOBODY = 65534  # the uid and gid of "nobody": another user


def test_the_flag_wins_then_the_environment_then_the_user_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "from_env"))
    assert compile_cache.folder(str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert compile_cache.folder(None) == str(tmp_path / "from_env")
    assert compile_cache.folder("off") is None
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.folder(None) == str(tmp_path / "xdg" / "nin_jax" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.folder(None) == str(tmp_path / "home" / ".cache" / "nin_jax" / "jax")


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="--compile_cache .* cannot be created"):
        compile_cache.enable(str(tmp_path / "a_file" / "cache"))
    result = run_cli("--compile_cache", str(tmp_path / "a_file" / "cache"), "--data_dir", "/nonexistent")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "cannot be created (Not a directory); name another folder, or pass --compile_cache off" in result.stderr


def test_train_py_caches_the_steps_and_the_initializer_unless_off(tmp_path):
    data, cache = tmp_path / "arrays.npz", tmp_path / "cache"
    random_arrays(data, 8, 8)
    args = ("train.py", "--data_arrays", str(data), "--resize", "67", "--batch_size", "8", "--num_epochs", "1")
    env = {"JAX_COMPILATION_CACHE_DIR": str(cache)}
    off = run_script(sys.executable, *args, "--compile_cache", "off", env=env)
    assert off.returncode == 0, off.stderr
    assert not cache.exists() or not os.listdir(cache)
    on = run_script(sys.executable, *args, env=env)
    assert on.returncode == 0, on.stderr
    names = {name.split("-")[0] for name in os.listdir(cache)}
    assert {"jit_carried_train_step", "jit_totalled_eval_step", "jit_init"} <= names


# A process that compiles a small program with the cache in argv[1]; every compile is stored.
COMPILE = """
import sys
import jax
import jax.numpy as jnp
from nin_jax import compile_cache
compile_cache.enable(sys.argv[1])
print(float(jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.full((32, 32), 0.01))))
"""


def compile_with_cache(cache):
    return subprocess.run([sys.executable, "-c", COMPILE, str(cache)], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT, env={**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})


def entries(cache) -> list[str]:
    return sorted(os.listdir(cache))


def test_a_new_cache_folder_is_private_to_its_user_and_holds_whole_entries(tmp_path):
    cache = tmp_path / "new" / "cache"
    result = compile_with_cache(cache)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert entries(cache) and all(name.endswith("-cache") for name in entries(cache))


def _tiny_run(tmp_path, *flags, workdir: str = "run"):
    data = tmp_path / "arrays.npz"
    if not data.exists():
        random_arrays(data, 16, 8)  # two steps: the second one's loss shows the first update
    return run_cli("--data_arrays", str(data), "--resize", "67", "--batch_size", "8", "--num_epochs", "1",
                   "--workdir", str(tmp_path / workdir), *flags)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_cache_folder_that_others_can_write_is_refused_in_one_line(tmp_path, mode):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    result = _tiny_run(tmp_path, "--compile_cache", str(cache))
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"train.py: error: the compile cache {cache} can be written by other users (mode {mode & 0o777:o}), who could "
        f"plant compiled code there that this run would execute; chmod 700 {cache}, or name another folder with "
        f"--compile_cache, or pass --compile_cache off (see --help)\n")
    assert not entries(cache)


def test_a_cache_folder_of_another_user_is_refused_in_one_line(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, NOBODY, NOBODY)
    result = _tiny_run(tmp_path, "--compile_cache", str(cache))
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"train.py: error: the compile cache {cache} belongs to another user (uid {NOBODY}), who could plant compiled "
        f"code there that this run would execute; name a folder of your own with --compile_cache, or pass "
        f"--compile_cache off (see --help)\n")


def test_a_read_only_cache_folder_is_one_line_and_the_run_goes_on_without_it(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "1M") as disk:
        cache = disk / "cache"
        cache.mkdir(mode=0o700)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = compile_with_cache(cache)
        assert result.returncode == 0 and float(result.stdout) > 0, result.stderr
        assert result.stderr == (f"-c: warning: the compile cache {cache} cannot be written (Read-only file system); "
                                 f"this run goes on without it\n")
