"""Every command at the edges of its process: the paths it is given, the GPU or TPU plugins
installed beside JAX, a stdout or stderr that is closed or broken, and the signals that stop it.
Each ends in one line and a documented status, as train.py does."""

import os
import subprocess
import sys

import pytest

from nin_jax import export, export_arrays, plan, predict

from conftest import REPO_ROOT

COMMANDS = {"predict": predict, "export": export, "export_arrays": export_arrays, "plan": plan}


@pytest.mark.parametrize("command, argv, flag, required", [
    ("predict", ["--workdir", ""], "workdir", True),
    ("predict", ["--workdir", "W", "--data_dir", " "], "data_dir", False),
    ("predict", ["--workdir", "W", "--manual_dir", ""], "manual_dir", False),
    ("export", ["--workdir", "", "--out", "F"], "workdir", True),
    ("export", ["--workdir", "W", "--out", " "], "out", True),
    ("export_arrays", ["--out", ""], "out", True),
    ("plan", ["--target", "h100", "--json", ""], "json", False),
])
def test_an_empty_path_is_refused_in_one_line_before_anything_is_read(command, argv, flag, required, capsys):
    """What `--workdir "$W"` gives when W is unset: refused as train.py refuses it."""
    with pytest.raises(SystemExit) as end:
        COMMANDS[command].main(argv)
    assert end.value.code == 2
    advice = "give a path" if required else "give a path, or leave the flag out"
    assert capsys.readouterr().err == (f"python -m nin_jax.{command}: error: --{flag} is empty (an unset shell "
                                       f"variable?); {advice} (see --help)\n")
