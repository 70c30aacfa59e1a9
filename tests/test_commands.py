"""Every command at the edges of its process: the paths it is given, the GPU or TPU plugins
installed beside JAX, a stdout or stderr that is closed or broken, and the signals that stop it.
Each ends in one line and a documented status, as train.py does."""

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from nin_jax.tools import export, export_arrays, predict
from nin_jax.tools.plan import command as plan, targets

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


# ---------------------------------------------------------------------------------------------
# A small run on data arrays, which train.py reads without the suite's fake data (and its CPU pin).

NUM_EXAMPLES = 64
SMALL_JOB = ["--resize=67", "--batch_size=8", "--num_epochs=2", "--train_examples=16", "--eval_examples=8",
             "--parallel=jit"]  # the suite's compile cache (tests/conftest.py): each compile once
CPU_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    import numpy as np

    from nin_jax.data import data_arrays
    from nin_jax import input_pipeline

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "fashion_mnist.npz"
    data_arrays.save({split: input_pipeline.Split(rng.integers(0, 256, (NUM_EXAMPLES, 28, 28, 1), dtype=np.uint8),
                                                  rng.integers(0, 10, NUM_EXAMPLES).astype(np.int32))
                      for split in input_pipeline.SPLITS}, str(path))
    return path


@pytest.fixture(scope="module")
def trained(arrays, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained") / "run"
    result = subprocess.run([sys.executable, "train.py", *SMALL_JOB, f"--data_arrays={arrays}", f"--workdir={workdir}"],
                            capture_output=True, text=True, timeout=300, env=CPU_ENV, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    return workdir


def command_line(command: str, workdir, tmp_path, arrays=None) -> list[str]:
    """The command's arguments after `python`: a small job of each."""
    return {"train": ["train.py", *SMALL_JOB, f"--data_arrays={arrays}", f"--workdir={tmp_path / 'run'}"],
            "export": ["-m", "nin_jax.export", f"--workdir={workdir}", f"--out={tmp_path / 'nin.jax_exported'}"],
            "predict": ["-m", "nin_jax.predict", f"--workdir={workdir}"],
            "plan": ["-m", "nin_jax.plan", "--target=h100"],  # compiles for tens of seconds
            "plan_local": ["-m", "nin_jax.plan", "--target=local"]}[command]


def prog(command: str) -> str:
    return "train.py" if command == "train" else f"python -m nin_jax.{command.split('_')[0]}"


# ---------------------------------------------------------------------------------------------
# A GPU or TPU plugin installed where its device is not.

def _plugins_without_their_devices() -> bool:
    import importlib.util

    from jax._src import hardware_utils

    def installed(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:
            return False

    cuda = installed("jax_plugins.xla_cuda12") or installed("jax_plugins.xla_cuda13")
    return ((cuda or installed("libtpu")) and not hardware_utils.has_visible_nvidia_gpu()
            and not hardware_utils.num_available_tpu_chips_and_device_id()[0])


# The plan compiles for a GPU with jax's CUDA plugin ('.[plan]'); an environment without it (CI's
# newest-JAX one) leaves those cases to the environments that have it.
NEEDS_CUDA_PLUGIN = pytest.mark.skipif(not any(map(targets._importable, targets.CUDA_PLUGINS)),
                                       reason="the plan for a GPU needs jax's CUDA plugin ('.[plan]')")


@pytest.mark.skipif(not _plugins_without_their_devices(),
                    reason="needs jax's CUDA plugin or libtpu installed on a machine without a GPU or TPU ('.[plan]')")
@pytest.mark.parametrize("command", ["train", "export", "predict", "plan_local"])
def test_a_plugin_that_finds_no_device_is_one_line_and_the_command_runs_on_the_cpu(command, trained, arrays, tmp_path):
    """With the '[plan]' extra on a machine without a GPU, every command printed JAX's 'Jax plugin
    configuration error' with a 10 to 20-line traceback, and libtpu's lines. The suite pins JAX to
    the CPU; these processes run without the pin, as a user's would."""
    from accelerator import unpinned_env

    result = subprocess.run([sys.executable, *command_line(command, trained, tmp_path, arrays)], capture_output=True,
                            text=True, timeout=300, env=unpinned_env(), cwd=REPO_ROOT)
    found_nothing = r"(jax's CUDA plugin finds no NVIDIA GPU|libtpu finds no TPU)( and libtpu finds no TPU)? here"
    if command == "plan_local":  # it plans for the accelerator attached here: there is none
        assert result.returncode == 1, result.stderr
        assert re.fullmatch(rf"python -m nin_jax.plan: error: --target local plans for the GPU or TPU attached here, "
                            rf"and {found_nothing}; plan for a listed target instead \(--list\), or for this CPU with "
                            rf"JAX_PLATFORMS=cpu\n", result.stderr)
        return
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"{re.escape(prog(command))}: {found_nothing}; running on the CPU \(set JAX_PLATFORMS=cpu "
                        rf"to skip this check and this line\)\n", result.stderr), result.stderr
    if command == "train":
        assert "on 1 cpu device" in result.stdout


# ---------------------------------------------------------------------------------------------
# A stdout or stderr that is closed or broken.

def shell(command_line: list[str], redirection: str, stderr_file):
    """Runs `python command_line redirection` in bash, stderr into `stderr_file` unless redirected."""
    quoted = " ".join(shlex.quote(part) for part in [sys.executable, *command_line])
    script = f"{quoted} 2>{shlex.quote(str(stderr_file))} {redirection}; exit ${{PIPESTATUS[0]}}"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300, env=CPU_ENV,
                          cwd=REPO_ROOT)


@pytest.mark.parametrize("redirection, reason", [
    ("| head -1", "Broken pipe"),
    ("> /dev/full", "No space left on device"),
    (">&-", None),
    ("2>&-", None),
])
def test_a_closed_or_broken_stdout_loses_no_epoch(arrays, tmp_path, redirection, reason):
    """`| head -1` was a BrokenPipeError at the epoch line, exit 1, and the epoch lost; `> /dev/full`
    an OSError traceback; `>&-` an AttributeError traceback at exit, status 1."""
    stderr_file = tmp_path / "stderr"
    stderr_file.write_text("")
    result = shell(command_line("train", None, tmp_path, arrays), redirection, stderr_file)
    assert result.returncode == 0, stderr_file.read_text()
    workdir = tmp_path / "run"
    assert sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())[-1] == 4
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 2
    expected = f"train.py: warning: cannot write to stdout ({reason}); going on without it\n" if reason else ""
    assert stderr_file.read_text() == expected


@pytest.mark.parametrize("command", ["export", "plan_list"])
def test_the_other_commands_survive_a_full_stdout_in_one_line(trained, tmp_path, command):
    stderr_file = tmp_path / "stderr"
    line = ["-m", "nin_jax.plan", "--list"] if command == "plan_list" else command_line(command, trained, tmp_path)
    result = shell(line, "> /dev/full", stderr_file)
    assert result.returncode == 0, stderr_file.read_text()
    assert stderr_file.read_text() == (f"{prog(command)}: warning: cannot write to stdout (No space left on device); "
                                       f"going on without it\n")
    if command == "export":
        assert (tmp_path / "nin.jax_exported").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# Stop signals.

# Runs `python -m MODULE ARGS` with the checkpoint's restore made to print a line and then wait,
# so that a signal reaches the command in the middle of its work on every machine.
RESTORED_THEN_WAITING = """
import runpy, sys, time
from nin_jax.run.checkpoints import Checkpoints

restore = Checkpoints.restore_latest

def restore_then_wait(self, *args):
    snapshot = restore(self, *args)
    print("restored", flush=True)
    time.sleep(120)
    return snapshot

Checkpoints.restore_latest = restore_then_wait
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("command, signum, moment", [
    ("train", signal.SIGTERM, 0.5),  # while it imports
    ("export", signal.SIGINT, 0.5),
    ("export", signal.SIGINT, "restored"),  # once the checkpoint is read
    ("export", signal.SIGTERM, "restored"),
    ("predict", signal.SIGINT, "restored"),
    ("predict", signal.SIGHUP, "restored"),
    pytest.param("plan", signal.SIGTERM, 3.0, marks=NEEDS_CUDA_PLUGIN),  # while it compiles for the GPU
    pytest.param("plan", signal.SIGINT, 6.0, marks=NEEDS_CUDA_PLUGIN),
])
def test_a_stop_signal_ends_a_command_with_one_line_and_its_status(trained, tmp_path, command, signum, moment,
                                                                    arrays):
    """Ctrl-C in export or predict printed its line, then the process crashed (SIGSEGV) in 3 of 4
    tries; SIGTERM to export, predict or plan exited 143 without a word."""
    arguments = command_line(command, trained, tmp_path, arrays)
    if moment == "restored":
        arguments = ["-c", RESTORED_THEN_WAITING, *arguments[1:]]
    process = subprocess.Popen([sys.executable, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=CPU_ENV, cwd=REPO_ROOT)
    deadline = threading.Timer(120, process.kill)  # a command that never prints its marker is not waited for
    deadline.start()
    try:
        if moment == "restored":
            assert process.stdout.readline() == "restored\n"
        else:
            time.sleep(moment)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        deadline.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signum, stderr
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    assert re.fullmatch(rf"{re.escape(prog(command))}: interrupted{by}(; .*)?\n", stderr), stderr
    assert sorted(os.listdir(tmp_path)) in ([], ["run"])  # the export neither written nor left as a temporary


@NEEDS_CUDA_PLUGIN
def test_plan_leaves_the_persistent_compilation_cache_alone(tmp_path):
    """Found by tests/test_flag_draws.py: with JAX_COMPILATION_CACHE_DIR set, a second plan read the
    entry the first had written for the compile-only GPU, could not load it, and printed JAX's
    UserWarning ('PjRtCompiler must be constructed with a Client')."""
    env = {**CPU_ENV, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
    for _ in range(2):
        result = subprocess.run([sys.executable, "-m", "nin_jax.plan", "--target=h100", "--resize=67", "--batch_size=8",
                                 "--no-largest_batch"], capture_output=True, text=True, timeout=300, env=env,
                                cwd=REPO_ROOT)
        assert result.returncode == 0 and result.stderr == "", result.stderr


def test_plan_names_itself_when_it_refuses_a_recipe(capsys):
    """Found by tests/test_flag_draws.py: the recipe, read before the other flags, was refused as
    `plan.py: error: ...`."""
    with pytest.raises(SystemExit) as end:
        plan.main(["--target", "h100", "--recipe", ""])
    assert end.value.code == 2
    assert capsys.readouterr().err.startswith("python -m nin_jax.plan: error: argument --recipe: invalid choice: ''")
