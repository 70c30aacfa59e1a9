"""The persistent compilation cache: on by default, where the flag or the environment says, or off;
a folder only its user can write, whose entries are whole and that a full or read-only disk, a
damaged entry or one planted by another user never turns into warnings on every run."""

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from nin_jax.runtime import compile_cache
from nin_jax.config import ConfigError

from conftest import REPO_ROOT, mounted_tmpfs, random_arrays, run_cli, run_script

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
from nin_jax.runtime import compile_cache
default_xla_caches = jax.config.jax_persistent_cache_enable_xla_caches
if compile_cache.enable(sys.argv[1]):  # XLA's own caches (autotuning, kernels) as JAX sets them by default
    assert jax.config.jax_persistent_cache_enable_xla_caches == default_xla_caches
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


def _train_loss(tmp_path, workdir: str) -> float:
    return json.loads((tmp_path / workdir / "metrics.jsonl").read_text())["train_loss"]


def _train_step_entry(cache) -> str:
    (name,) = [name for name in entries(cache) if name.startswith("jit_carried_train_step-")]
    return str(cache / name)


@pytest.mark.slow  # four short training runs
def test_a_train_step_planted_under_another_runs_key_is_never_run(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("planting a file as another user needs root")
    planter, cache = tmp_path / "planter_cache", tmp_path / "cache"
    for rate, folder, workdir in (("0.05", planter, "at_0.05"), ("0.1", cache, "honest")):
        assert _tiny_run(tmp_path, "--learning_rate", rate, "--compile_cache", str(folder), workdir=workdir).returncode == 0
    planted_loss, honest_loss = _train_loss(tmp_path, "at_0.05"), _train_loss(tmp_path, "honest")
    assert planted_loss != honest_loss
    # Another user, let in by a folder that everyone can write, puts the 0.05 step under the 0.1 key.
    target = _train_step_entry(cache)
    os.unlink(target)
    shutil.copyfile(_train_step_entry(planter), target)
    os.chown(target, NOBODY, NOBODY)
    cache.chmod(0o777)
    refused = _tiny_run(tmp_path, "--learning_rate", "0.1", "--compile_cache", str(cache), workdir="attacked")
    assert refused.returncode == 2 and f"the compile cache {cache} can be written by other users" in refused.stderr
    # The user does as the line says; the entry that was planted meanwhile is dropped, not run.
    cache.chmod(0o700)
    result = _tiny_run(tmp_path, "--learning_rate", "0.1", "--compile_cache", str(cache), workdir="attacked")
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"train.py: warning: the compile cache {cache} held an entry of another user "
                             f"(uid {NOBODY}): {os.path.basename(target)}; dropped it and compiled anew, as any other "
                             f"such entry of this run\n")
    assert _train_loss(tmp_path, "attacked") == honest_loss
    assert os.stat(target).st_uid == os.geteuid()


def test_damaged_entries_are_dropped_with_one_line_once_then_stored_whole(tmp_path):
    cache = tmp_path / "cache"
    first = compile_with_cache(cache)
    assert first.returncode == 0, first.stderr
    for number, name in enumerate(entries(cache)):  # emptied (a full disk), torn (a crash), garbled
        path = cache / name
        path.write_bytes([b"", path.read_bytes()[:100], os.urandom(500)][number % 3])
    damaged = compile_with_cache(cache)
    assert damaged.returncode == 0 and damaged.stdout == first.stdout
    assert re.fullmatch(rf"-c: warning: the compile cache {re.escape(str(cache))} held a damaged entry: [^ ]+-cache "
                        rf"\([^\n]+\); dropped it and compiled anew, as any other such entry of this run\n",
                        damaged.stderr), damaged.stderr
    again = compile_with_cache(cache)
    assert again.returncode == 0 and again.stderr == "" and again.stdout == first.stdout


def test_a_full_disk_leaves_no_broken_entry_and_later_runs_are_quiet(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "2M") as disk:
        cache = disk / "cache"
        cache.mkdir(mode=0o700)
        filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):  # until: No space left on device
            while True:
                os.write(filler, bytes(4096))
        os.close(filler)
        full = compile_with_cache(cache)
        assert full.returncode == 0, full.stderr
        assert full.stderr == (f"-c: warning: cannot write to the compile cache {cache} (No space left on device); "
                               f"this run stores no more compiled programs there\n")
        assert not entries(cache)  # no empty or torn entry, no temporary file
        os.unlink(disk / "filler")
        freed = compile_with_cache(cache)
        assert freed.returncode == 0 and freed.stderr == "" and freed.stdout == full.stdout
        assert entries(cache)
        assert compile_with_cache(cache).stderr == ""


def test_a_read_only_cache_folder_is_one_line_and_the_run_goes_on_without_it(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "1M") as disk:
        cache = disk / "cache"
        cache.mkdir(mode=0o700)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = compile_with_cache(cache)
        assert result.returncode == 0 and float(result.stdout) > 0, result.stderr
        assert result.stderr == (f"-c: warning: the compile cache {cache} cannot be written (Read-only file system); "
                                 f"this run goes on without it\n")
