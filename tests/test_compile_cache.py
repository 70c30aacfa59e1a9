"""The persistent compilation cache: on by default, where the flag or the environment says, or off."""

import os
import sys

import pytest

from nin_jax import compile_cache
from nin_jax.config import ConfigError

from test_benchmarks import random_arrays, run_script
from test_train import run_cli


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
