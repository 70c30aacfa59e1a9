"""train.py on random flag values drawn from each flag's type: every draw ends with status 0, or with
one line on stderr and a documented non-zero status (1: the run could not go on, 2: the flags were
refused), never a traceback; a refused draw leaves its workdir as it was.

Each draw sets a few flags, chosen at random, on top of a small job, each to a value drawn from the
values of its type below (valid ones, edge ones and wrong ones). The flags of several processes
and hosts are left out: a draw that named a coordinator would wait for peers that never come.

    NIN_JAX_FLAG_DRAWS=200 python -m pytest -n 2 tests/test_flag_draws.py   # CI draws fewer
"""

import dataclasses
import hashlib
import os
import subprocess
import sys
import typing

import numpy as np
import pytest

from nin_jax.config import DEVICES, Config

from conftest import REPO_ROOT

DRAWS = int(os.environ.get("NIN_JAX_FLAG_DRAWS", "12"))
FLAGS_PER_DRAW = (1, 4)
SMALL_JOB = ["--resize", "67", "--batch_size", "8", "--num_epochs", "1", "--train_examples", "16",
             "--eval_examples", "8", "--compile_cache", "off"]
STATUSES = (0, 1, 2)  # docs/failure_behaviour.md
INTS = ("-1", "0", "1", "2", "3", "x", "1.5")
FLOATS = ("nan", "inf", "-1", "0", "0.001", "0.1", "0.5", "1", "2", "x")
# Flags whose large valid values would make a long run; their other values are those of their type.
SMALL_INTS = {"num_epochs": ("-1", "0", "1", "2"), "batch_size": ("-1", "0", "3", "8", "16"),
              "resize": ("-1", "66", "67", "70"), "train_examples": ("-1", "0", "5", "16"),
              "eval_examples": ("-1", "0", "5"), "profile_steps": ("-1", "0", "1")}
LEFT_OUT = {field.name for field in dataclasses.fields(Config) if field.metadata["group"] == DEVICES} - {"parallel"}


def values_of(field: dataclasses.Field, tmp: str) -> tuple[str, ...]:
    """The values a draw may give `--name`; for a bool, the flag's two forms are drawn instead."""
    hint = typing.get_type_hints(Config)[field.name]
    kind = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
    if field.name in SMALL_INTS:
        return SMALL_INTS[field.name]
    if "choices" in field.metadata:
        return (*field.metadata["choices"], "nope", "")
    if kind is int:
        return INTS
    if kind is float:
        return FLOATS
    if field.name == "data_arrays":
        return ("", " ", f"{tmp}/missing.npz", f"{tmp}/a_file", f"{tmp}/a_folder")
    return ("", " ", f"{tmp}/new", f"{tmp}/a_file", f"{tmp}/a_folder", f"{tmp}/a_file/below", "off")


def draw_flags(seed: int, tmp: str) -> list[str]:
    rng = np.random.default_rng(seed)
    fields = [field for field in dataclasses.fields(Config) if field.name not in LEFT_OUT]
    flags = []
    for index in rng.choice(len(fields), rng.integers(*FLAGS_PER_DRAW, endpoint=True), replace=False):
        field = fields[index]
        if typing.get_type_hints(Config)[field.name] is bool:
            flags.append(f"--{'' if rng.integers(2) else 'no-'}{field.name}")
        else:
            values = values_of(field, tmp)
            flags.append(f"--{field.name}={values[rng.integers(len(values))]}")
    return flags


def tree_digest(folder) -> str:
    """Names, sizes and contents of every file below `folder`."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files) + [f"{d}/" for d in dirs]:
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode())
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(DRAWS))
def test_a_random_draw_of_flags_ends_in_status_0_or_one_line(tmp_path, seed):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    flags = draw_flags(seed, str(tmp_path))
    before = tree_digest(tmp_path)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tests", "fake_data_train.py"), "64", *SMALL_JOB,
         f"--workdir={tmp_path}/run", *flags],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"},
    )
    shown = f"flags {flags}: status {result.returncode}\n{result.stderr}"
    assert result.returncode in STATUSES, shown
    assert "Traceback" not in result.stderr, shown
    if result.returncode:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fake_data_train.py: "), shown
    if result.returncode == 2:
        assert tree_digest(tmp_path) == before, shown
