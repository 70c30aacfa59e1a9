"""The recipe as flags (nin_jax/config.py): recipes and their bounds, counts that size memory
refused before anything is allocated, a malformed coordinator address, and path flags that this
process cannot pass on (a non-UTF-8 --workdir under a C locale), each in one line."""

import dataclasses
import os
import time

import pytest

import train
from nin_jax.config import RECIPES, Config, ConfigError, parse_flags

from conftest import (HELPER, SMALL_JIT_JOB, SMALL_JOB, fake_run, limited_address_space, module_run, one_line,
                      run_on_cpu)


def test_recipe_flag_sets_defaults_that_explicit_flags_override():
    config, _ = parse_flags(train.build_parser(), ["--recipe", "strong", "--learning_rate", "0.01"])
    assert config == Config.from_recipe("strong", learning_rate=0.01)
    assert (config.momentum, config.nesterov, config.batch_norm, config.learning_rate) == (0.9, True, True, 0.01)
    assert parse_flags(train.build_parser(), [])[0] == Config()


def test_every_recipe_is_a_valid_config_and_the_reference_changes_nothing():
    assert RECIPES["reference"] == {}
    for name in RECIPES:
        Config.from_recipe(name).validate()
    with pytest.raises(ConfigError, match="--recipe must be one of reference, strong"):
        Config.from_recipe("fast")


@pytest.mark.parametrize("changes, message", [
    (dict(momentum=1.0), "--momentum must be in [0, 1)"),
    (dict(nesterov=True), "--nesterov needs a --momentum above 0"),
    (dict(warmup_epochs=11.0), "--warmup_epochs must be in [0, --num_epochs=10]"),
    (dict(weight_decay=-1.0), "--weight_decay must be 0 (off) or positive"),
    (dict(label_smoothing=1.0), "--label_smoothing must be in [0, 1)"),
    (dict(lr_schedule="linear"), "--lr_schedule must be one of constant, cosine, onecycle"),
])
def test_impossible_recipe_values_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(Config(), **changes).validate()


@pytest.mark.parametrize("flag, value, message", [
    ("--devices", "1000000000", "--devices must be from 1 to 16 (the GPUs of one host), got 1000000000"),
    ("--batch_size", "1000000000", "--batch_size must be from 1 to 65,536, got 1000000000"),
    ("--resize", "100000", "--resize must be from 67 to 1,024 (NiN's pools need at least 67), got 100000"),
])
def test_a_count_that_would_fill_the_memory_is_refused_before_anything_is_allocated(flag, value, message):
    """`--target h100 --devices 1000000000` grew to 20 GB and was killed by the kernel, in silence."""
    result = run_on_cpu(["-m", "nin_jax.plan", "--target", "h100", flag, value], preexec_fn=limited_address_space)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == f"python -m nin_jax.plan: error: {message} (see --help)\n"


@pytest.mark.parametrize("flags, message", [
    (["--batch_size=1000000000"], "--batch_size must be from 1 to 65,536, got 1000000000"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=1000000000"],
     "--num_processes must be from 1 to 100,000, got 1000000000"),
    (["--peer_timeout_seconds=100000000000"], "--peer_timeout_seconds must be from 1 to 86,400 (a day), got 100000000000"),
    (["--coordinator_address=localhost", "--num_processes=2"],
     "--coordinator_address localhost is not host:port (such as 10.0.0.1:1234 or [fe80::1]:1234)"),
    (["--coordinator_address=localhost:abc", "--num_processes=2"],
     "--coordinator_address localhost:abc is not host:port (such as 10.0.0.1:1234 or [fe80::1]:1234)"),
    (["--coordinator_address=127.0.0.1:99999", "--num_processes=2"],
     "--coordinator_address 127.0.0.1:99999: the port must be from 1 to 65535"),
    (["--coordinator_address=a b:1234", "--num_processes=2"],
     "--coordinator_address a b:1234 is not host:port (such as 10.0.0.1:1234 or [fe80::1]:1234)"),
])
def test_train_refuses_such_counts_and_a_malformed_coordinator_address_in_one_line(flags, message):
    start = time.monotonic()
    result = run_on_cpu([HELPER, "64", *SMALL_JOB, *flags], preexec_fn=limited_address_space)
    assert time.monotonic() - start < 30
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"fake_data_train.py: error: {message} (see --help)\n"


C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}


@pytest.fixture(scope="module")
def non_ascii_run(tmp_path_factory):
    """A finished run in a folder named in UTF-8, trained under a UTF-8 locale."""
    workdir = tmp_path_factory.mktemp("runs") / "lauf-\N{LATIN SMALL LETTER U WITH DIAERESIS}"
    result = fake_run(*SMALL_JIT_JOB, f"--workdir={workdir}", env={"LC_ALL": "C.UTF-8"})
    assert result.returncode == 0, result.stderr.decode()
    return workdir


def test_a_non_ascii_workdir_under_a_c_locale_is_refused_in_one_line_never_called_damaged(non_ascii_run, tmp_path):
    """Under LC_ALL=C without UTF-8 mode, Python holds a non-ASCII path as undecodable bytes, which
    orbax and tensorstore cannot take: the run is refused before anything is read or written,
    not trained and then unsaved, and its good checkpoint is not called damaged."""
    before = sorted(os.listdir(non_ascii_run / "checkpoints"))
    result = fake_run(*SMALL_JIT_JOB, "--num_epochs=2", f"--workdir={non_ascii_run}", env=C_LOCALE)
    assert result.returncode == 2, result.stderr.decode()
    line = one_line(result)
    assert line.startswith("fake_data_train.py: error: --workdir ") and "damaged" not in line
    assert "UTF-8" in line and "LC_ALL=C.UTF-8" in line, line
    assert sorted(os.listdir(non_ascii_run / "checkpoints")) == before

    fresh = tmp_path / "neu-\N{LATIN SMALL LETTER U WITH DIAERESIS}"
    result = fake_run(*SMALL_JIT_JOB, f"--workdir={fresh}", env=C_LOCALE)
    assert result.returncode == 2 and "--workdir " in one_line(result)
    assert not fresh.exists()  # refused before training, so no epoch was trained and lost


@pytest.mark.parametrize("command", ["predict", "export"])
def test_predict_and_export_refuse_such_a_workdir_in_one_line(non_ascii_run, tmp_path, command):
    if command == "predict":
        result = fake_run("predict", f"--workdir={non_ascii_run}", env=C_LOCALE)
    else:
        result = module_run("nin_jax.export", f"--workdir={non_ascii_run}", f"--out={tmp_path / 'nin.jax_exported'}",
                            env=C_LOCALE)
    assert result.returncode == 2, result.stderr.decode()
    line = one_line(result)
    assert "error: --workdir " in line and "UTF-8" in line and "damaged" not in line, line


def test_the_same_workdir_under_a_utf8_locale_resumes(non_ascii_run):
    result = fake_run(*SMALL_JIT_JOB, "--num_epochs=2", f"--workdir={non_ascii_run}", env={"LC_ALL": "C.UTF-8"})
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().startswith("resuming from the checkpoint of step 2 ")
