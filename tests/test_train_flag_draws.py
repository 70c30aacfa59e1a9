"""Every command on random flag values drawn from each flag's type, in a random environment: every
draw ends with status 0, or with one line on stderr and a documented non-zero status (1: the run
could not go on, 2: the flags were refused), never a traceback; a refused draw leaves its folder as
it was. Lines that say what a command went on without (a stdout that cannot be written) may come
beside it.

Each draw picks a command (train.py, export, predict, class_maps, plan), an environment (a umask,
a locale, a stdout that is a pipe, closed, full or broken), and a few of the command's flags, each set to a
value drawn from the values of its type below (valid ones, edge ones and wrong ones), on top of a
small job. The flags of several processes and hosts are left out: a draw that named a
coordinator would wait for peers that never come.

    NIN_JAX_FLAG_DRAWS=200 python -m pytest -n 2 tests/test_train_flag_draws.py   # CI draws fewer
"""

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import typing

import numpy as np
import pytest

from nin_jax.config import DEVICES, Config

from conftest import HELPER, REPO_ROOT, SMALL_JOB

DRAWS = int(os.environ.get("NIN_JAX_FLAG_DRAWS", "12"))
FLAGS_PER_DRAW = (1, 4)
STATUSES = (0, 1, 2)  # docs/failure_behaviour.md
INTS = ("-1", "0", "1", "2", "3", "x", "1.5")
FLOATS = ("nan", "inf", "-1", "0", "0.001", "0.1", "0.5", "1", "2", "x")
# Flags whose large valid values would make a long run; their other values are those of their type.
SMALL_INTS = {"num_epochs": ("-1", "0", "1", "2"), "batch_size": ("-1", "0", "3", "8", "16"),
              "resize": ("-1", "66", "67", "70"), "train_examples": ("-1", "0", "5", "16"),
              "eval_examples": ("-1", "0", "5"), "profile_steps": ("-1", "0", "1")}
LEFT_OUT = {field.name for field in dataclasses.fields(Config) if field.metadata["group"] == DEVICES} - {"parallel"}

COMMANDS = ("train", "export", "predict", "class_maps", "plan")
UMASKS = (0o022, 0o077, 0o027)
LOCALES = ({"LC_ALL": "C.UTF-8"}, {"LC_ALL": "C", "PYTHONUTF8": "0"}, {"LC_ALL": "C"})
STDOUTS = ("pipe", "closed", "full", "broken")


def paths(tmp: str) -> tuple[str, ...]:
    return ("", " ", f"{tmp}/new", f"{tmp}/a_file", f"{tmp}/a_folder", f"{tmp}/a_file/below",
            f"{tmp}/neu-\N{LATIN SMALL LETTER U WITH DIAERESIS}")


def values_of(field: dataclasses.Field, tmp: str) -> tuple[str, ...]:
    """The values a draw may give `--name` of train.py; for a bool, the flag's two forms are drawn instead."""
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
    return (*paths(tmp), "off")


def own_flags(command: str, tmp: str) -> dict[str, tuple[str, ...]]:
    """The flags of the other commands, with their values (None: a bool flag, drawn in its two forms)."""
    trained = f"{tmp}/trained"
    return {"export": {"workdir": (*paths(tmp), trained), "out": (*paths(tmp), f"{tmp}/nin.jax_exported")},
            "predict": {"workdir": (*paths(tmp), trained), "data_dir": paths(tmp), "manual_dir": paths(tmp),
                        "num_images": (*INTS, "100", "101")},
            "class_maps": {"workdir": (*paths(tmp), trained), "data_dir": paths(tmp), "num_images": (*INTS, "101"),
                           "measured": INTS, "class": ("bag", "ankle boot", "nope", "")},
            "plan": {"target": ("h100", "l4", "local", "nope"), "devices": (*INTS, "16", "17"),
                     "json": (*paths(tmp), f"{tmp}/plan.json"), "largest_batch": None}}.get(command, {})


def draw(seed: int, tmp: str) -> tuple[str, dict, list[str]]:
    """The draw's command, environment (umask, locale, stdout) and flags."""
    rng = np.random.default_rng(seed)
    command = COMMANDS[rng.integers(len(COMMANDS))]
    environment = {"umask": UMASKS[rng.integers(len(UMASKS))], "locale": LOCALES[rng.integers(len(LOCALES))],
                   "stdout": STDOUTS[rng.integers(len(STDOUTS))]}
    choices = {name: values for name, values in own_flags(command, tmp).items()}
    if command in ("train", "plan"):  # plan takes train.py's flags, to plan the run that train.py would make
        bools = {name for name, hint in typing.get_type_hints(Config).items() if hint is bool}
        choices.update({field.name: None if field.name in bools else values_of(field, tmp)
                        for field in dataclasses.fields(Config) if field.name not in LEFT_OUT})
    names = sorted(choices)
    flags = []
    for index in rng.choice(len(names), min(len(names), rng.integers(*FLAGS_PER_DRAW, endpoint=True)), replace=False):
        name, values = names[index], choices[names[index]]
        if values is None:
            flags.append(f"--{'' if rng.integers(2) else 'no-'}{name}")
        else:
            flags.append(f"--{name}={values[rng.integers(len(values))]}")
    return command, environment, flags


def command_line(command: str, tmp: str, flags: list[str]) -> tuple[list[str], str]:
    """The process's arguments and the name its lines begin with."""
    if command == "train":
        return [HELPER, "64", *SMALL_JOB, f"--workdir={tmp}/run",
                *flags], "fake_data_train.py"
    base = {"export": [f"--workdir={tmp}/trained", f"--out={tmp}/nin.jax_exported"],
            "predict": [f"--workdir={tmp}/trained"],
            "class_maps": [f"--workdir={tmp}/trained"],
            "plan": ["--resize=67", "--batch_size=8", "--no-largest_batch",
                     *([] if any(flag.startswith("--target=") for flag in flags) else ["--target=h100"])]}[command]
    return ["-m", f"nin_jax.{command}", *base, *flags], f"python -m nin_jax.{command}"


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


def run_in(environment: dict, arguments: list[str], cwd) -> subprocess.CompletedProcess:
    """`python arguments` under the drawn umask, locale and stdout."""
    closed = environment["stdout"] == "closed"

    def prepare():
        os.umask(environment["umask"])
        if closed:
            os.close(1)

    read_end = write_end = None
    if environment["stdout"] == "broken":  # a reader that has gone: every write meets EPIPE
        read_end, write_end = os.pipe()
        os.close(read_end)
    stdout = {"pipe": subprocess.PIPE, "closed": None, "full": open("/dev/full", "wb"),
              "broken": write_end}[environment["stdout"]]
    try:
        return subprocess.run([sys.executable, *arguments], stdout=stdout, stderr=subprocess.PIPE, timeout=300, cwd=cwd,
                              preexec_fn=prepare, env={**os.environ, **environment["locale"], "JAX_PLATFORMS": "cpu",
                                                       "PYTHONUNBUFFERED": "1"})
    finally:
        if environment["stdout"] == "full":
            stdout.close()
        if write_end is not None:
            os.close(write_end)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(DRAWS))
def test_a_random_draw_ends_in_status_0_or_one_line(tmp_path, seed, trained):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    command, environment, flags = draw(seed, str(tmp_path))
    if command in ("export", "predict", "class_maps"):
        shutil.copytree(trained, tmp_path / "trained")
    arguments, prog = command_line(command, str(tmp_path), flags)
    before = tree_digest(tmp_path)
    result = run_in(environment, arguments, cwd=tmp_path if command == "train" else REPO_ROOT)
    stderr = result.stderr.decode(errors="replace")
    shown = f"{command} {flags} in {environment}: status {result.returncode}\n{stderr}"
    assert result.returncode in STATUSES, shown
    assert "Traceback" not in stderr, shown
    lines = stderr.splitlines()
    assert all(line.startswith(f"{prog}: ") for line in lines), shown
    said = [line for line in lines if not line.startswith(f"{prog}: warning: cannot write to stdout")]
    if result.returncode:
        planned_no = command == "plan" and result.returncode == 1 and not said  # a table that says the step fails
        assert len(said) == 1 or planned_no, shown
    else:
        assert not said, shown
    if result.returncode == 2:
        assert tree_digest(tmp_path) == before, shown
