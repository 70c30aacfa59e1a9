"""Every command at the edges of its process (nin_jax/runtime/commands.py): the paths it is given,
a stdout or stderr that is closed or broken, and the signals that stop it. Each ends in one line
and a documented status, as train.py does."""

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from nin_jax.tools import export, export_arrays, predict
from nin_jax.tools.plan import command as plan

from conftest import CPU_ENV, NEEDS_CUDA_PLUGIN, REPO_ROOT, command_line, prog


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


# A library of jax's CUDA plugin, which JAX loads as it starts its first backend (the CPU's too),
# inside its discovery of plugins, whose bare `except:` swallows whatever is raised there.
PLUGIN_LOADING = "libcublas"


def wait_until_loaded(process, library: str) -> None:
    """Returns as soon as `library` is in the memory map of `process`."""
    while library not in pathlib.Path(f"/proc/{process.pid}/maps").read_text():
        assert process.poll() is None, "the command ended before it loaded " + library


@pytest.mark.parametrize("command, signum, moment", [
    ("train", signal.SIGTERM, 0.5),  # while it imports
    ("export", signal.SIGINT, 0.5),
    ("export", signal.SIGINT, "restored"),  # once the checkpoint is read
    ("export", signal.SIGTERM, "restored"),
    ("predict", signal.SIGINT, "restored"),
    ("predict", signal.SIGHUP, "restored"),
    pytest.param("plan", signal.SIGTERM, 3.0, marks=NEEDS_CUDA_PLUGIN),  # while it compiles for the GPU
    pytest.param("plan", signal.SIGINT, 6.0, marks=NEEDS_CUDA_PLUGIN),
    pytest.param("train", signal.SIGTERM, PLUGIN_LOADING, marks=NEEDS_CUDA_PLUGIN),  # as JAX starts its backend
    pytest.param("export", signal.SIGTERM, PLUGIN_LOADING, marks=NEEDS_CUDA_PLUGIN),
])
def test_a_stop_signal_ends_a_command_with_one_line_and_its_status(trained, tmp_path, command, signum, moment,
                                                                    arrays):
    """Ctrl-C in export or predict printed its line, then the process crashed (SIGSEGV) in 3 of 4
    tries; SIGTERM to export, predict or plan exited 143 without a word. A signal as JAX loaded its
    CUDA plugin printed a traceback, after which train.py trained to the end and export wrote its
    file."""
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
        elif moment == PLUGIN_LOADING:
            wait_until_loaded(process, moment)
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


# A command that signals itself as tensorstore's compiled module (which orbax imports) imports numpy
# while it initializes, in a process that has not imported numpy yet.
SIGNALLED_IN_AN_EXTENSIONS_INIT = """
import os, signal, sys, time
from nin_jax.runtime import commands

def main():
    assert "numpy" not in sys.modules
    sent = []

    def signal_at_numpys_import(event, args):
        if event == "import" and args[0] == "numpy" and not sent:
            sent.append(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    sys.addaudithook(signal_at_numpys_import)
    with commands.stops_in_one_line("probe"):
        import tensorstore
        time.sleep(30)
    return 0

commands.run(main)
"""


def test_a_stop_signal_while_a_compiled_module_initializes_ends_the_command_in_one_line():
    """Found by tests/test_special_file_draws.py: a SIGHUP while orbax imported tensorstore became
    tensorstore's `ImportError: initialization failed`, and train.py ended in a traceback."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", SIGNALLED_IN_AN_EXTENSIONS_INIT], capture_output=True, text=True,
                            timeout=60, env=CPU_ENV, cwd=REPO_ROOT)
    assert (result.returncode, result.stderr) == (128 + signal.SIGTERM, "probe: interrupted by SIGTERM\n")
    assert time.monotonic() - start < 20, "the stop waited for the sleep after the import"


def test_jax_enable_x64_is_left_off_by_every_command_which_then_computes_in_float32():
    """JAX_ENABLE_X64=1 ended train.py in a TypeError after the steps had compiled for float32 (the
    whole run under JAX_ENABLE_X64=1 trains; this checks the edge every command starts through)."""
    probe = ("from nin_jax.runtime import commands; commands.begin(); import jax.numpy as jnp; "
             "print(jnp.asarray(1.0).dtype, jnp.zeros(2).sum().dtype)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**CPU_ENV, "JAX_ENABLE_X64": "1"}, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "float32 float32\n"
    assert result.stderr == ("-c: warning: JAX_ENABLE_X64=1 is left off: nin_jax computes in its --dtype "
                             "(float32 or bfloat16)\n")


SIGNAL_IN_A_COLLECTION = """
import gc, os, signal, sys, time
from nin_jax.runtime import commands
commands.begin()
from nin_jax.run import stopping

def signal_during_a_collection(phase, info):
    if phase == "start" and not gc.callbacks.clear():  # once: the stop is raised in here and swallowed
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(100_000))  # bytecode, where Python runs the handler

def main():
    gc.callbacks.append(signal_during_a_collection)
    try:
        with {block}:
            gc.collect()
            time.sleep(20)
    except commands.Terminated:
        sys.stderr.write("probe: interrupted by SIGTERM\\n")
        return 143
    print("went on")
    return 0

commands.run(main)
"""


@pytest.mark.parametrize("block", ["commands.stops_in_one_line('probe')", "stopping.signals_raise()"])
def test_a_stop_raised_inside_a_garbage_collection_is_raised_again_at_once(block):
    """Python only reports an exception raised in a collector's callback (JAX registers one) and
    goes on: train.py printed that report and trained on, its stop lost (a draw of
    tests/test_special_file_draws.py found it)."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", SIGNAL_IN_A_COLLECTION.format(block=block)], capture_output=True,
                            text=True, timeout=120, env=CPU_ENV, cwd=REPO_ROOT)
    assert (result.returncode, result.stderr, result.stdout) == (143, "probe: interrupted by SIGTERM\n", "")
    assert time.monotonic() - start < 15  # not after the block's 20 s
