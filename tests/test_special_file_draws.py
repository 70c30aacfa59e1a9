"""Every command with a special file where it reads or writes a file, and a stop signal at a drawn
moment: each draw ends within its bound, with status 0 or one line and a documented status (the
signal's 128 + its number among them; train.py, stopping in training, says first that it will),
never a hang or a traceback, and the special file is left as it was: nothing is opened through it
or replaces it (but a link, which a written file replaces), and nothing is written where a link
points.

Each draw picks a place (a file that train.py, export or predict reads or writes), what stands
there instead of the file (a FIFO, a device node, a link to a file that does not exist), and
whether SIGINT, SIGTERM or SIGHUP comes, and when, from 0 to 6 s after the process starts (a
signal before Python runs the command's first line ends it as the signal does, with nothing said).

    NIN_JAX_SPECIAL_FILE_DRAWS=200 python -m pytest -n 2 tests/test_special_file_draws.py   # CI draws fewer
"""

import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import CPU_ENV, REPO_ROOT, TWO_EPOCH_JOB, make_special_file, prog, random_arrays

DRAWS = int(os.environ.get("NIN_JAX_SPECIAL_FILE_DRAWS", "12"))
KINDS = ("fifo", "device", "dangling link")
# (command, place): the place is relative to the draw's folder, where `run` is train.py's workdir,
# `trained` a finished run's workdir, `arrays.npz` the data; `latest` is the newest checkpoint.
PLACES = (("train", "run/metrics.jsonl"), ("train", "run/config.json"), ("train", "run/curves.png"),
          ("train", "run/run.lock"), ("train", "run/checkpoints"), ("train", "arrays.npz"),
          ("export", "trained/config.json"), ("export", "trained/checkpoints/latest"), ("export", "nin.jax_exported"),
          ("predict", "trained/config.json"), ("predict", "trained/checkpoints/latest"),
          ("predict", "trained/predictions.png"))
SIGNALS = (None, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STATUSES = {0, 1, 2, 128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP}  # docs/failure_behaviour.md
BOUND_S = 120  # a small job's whole run, with room for a busy machine


def draw(seed: int) -> tuple[str, str, str, object, float]:
    """The draw's command, place, kind of special file, signal (or None) and the signal's moment."""
    rng = np.random.default_rng(seed)
    command, place = PLACES[rng.integers(len(PLACES))]
    return command, place, KINDS[rng.integers(len(KINDS))], SIGNALS[rng.integers(len(SIGNALS))], rng.uniform(0, 6)


def command_line(command: str, tmp) -> list[str]:
    return {"train": ["train.py", *TWO_EPOCH_JOB, f"--data_arrays={tmp / 'arrays.npz'}", f"--workdir={tmp / 'run'}"],
            "export": ["-m", "nin_jax.export", f"--workdir={tmp / 'trained'}", f"--out={tmp / 'nin.jax_exported'}"],
            "predict": ["-m", "nin_jax.predict", f"--workdir={tmp / 'trained'}"]}[command]


def plant(path, kind: str, tmp) -> None:
    """The special file at `path`, in place of whatever stood there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "dangling link":  # to a file that a write through the link could create
        os.makedirs(tmp / "elsewhere", exist_ok=True)
        os.symlink(tmp / "elsewhere" / "missing", path)
    else:
        make_special_file(path, kind)


def identity(path) -> tuple:
    """What the special file is: its type, device number and, for a link, where it points."""
    status = os.lstat(path)
    return stat.S_IFMT(status.st_mode), status.st_rdev, os.readlink(path) if os.path.islink(path) else None


def run_with_signal(arguments: list[str], signum, moment: float) -> tuple[int, str]:
    """`python arguments` in a process group of its own, signalled at `moment` s if still running;
    its status and stderr. A process that outlives BOUND_S fails the draw, and its group is killed."""
    with subprocess.Popen([sys.executable, *arguments], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=CPU_ENV, cwd=REPO_ROOT, start_new_session=True) as process:
        try:
            if signum is not None:
                try:
                    process.wait(moment)
                except subprocess.TimeoutExpired:
                    process.send_signal(signum)
            stderr = process.communicate(timeout=BOUND_S)[1]
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return process.returncode, stderr


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(DRAWS))
def test_a_special_file_in_any_place_and_a_signal_at_any_moment_end_in_one_line(tmp_path, seed, trained):
    command, place, kind, signum, moment = draw(seed)
    random_arrays(tmp_path / "arrays.npz", 16, 8)
    shutil.copytree(trained, tmp_path / "trained")
    latest = max((name for name in os.listdir(tmp_path / "trained" / "checkpoints") if name.isdigit()), key=int)
    path = tmp_path / place.replace("checkpoints/latest", f"checkpoints/{latest}")
    plant(path, kind, tmp_path)
    planted = identity(path)
    start = time.monotonic()
    status, stderr = run_with_signal(command_line(command, tmp_path), signum, moment)
    shown = (f"{command} with a {kind} at {place}, {signum and signal.Signals(signum).name} at {moment:.1f} s: "
             f"status {status} after {time.monotonic() - start:.1f} s\n{stderr}")
    before_python = signum is not None and status == -signum  # the signal's own end, before the first line ran
    assert status in STATUSES or before_python, shown
    assert "Traceback" not in stderr, shown
    said = [line for line in stderr.splitlines() if not line.startswith(f"{prog(command)}: warning: ")
            and not line.startswith("train.py: stopping after step")]  # a stop in training says so first
    assert len(said) == (0 if status == 0 or before_python else 1), shown
    assert all(line.startswith(f"{prog(command)}: ") for line in said), shown
    replaced_link = kind == "dangling link" and stat.S_ISREG(os.lstat(path).st_mode)  # as documented, for a written file
    assert replaced_link or identity(path) == planted, shown
    assert not os.path.lexists(tmp_path / "elsewhere" / "missing"), shown  # nothing written through a link
