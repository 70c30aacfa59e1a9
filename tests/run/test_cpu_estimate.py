"""How long a run will take on a CPU (nin_jax/run/cpu_estimate.py): said before it compiles, from
its steps' FLOPs, with a quick command to paste where it takes more than an hour, then timed on
its first steps."""

import os
import re
import subprocess
import sys
from unittest import mock

import pytest

from nin_jax.config import Config
from nin_jax.run import cpu_estimate

from conftest import REPO_ROOT, TRAINED_RUN_CONFIG, random_arrays, wait_until


def test_the_estimate_comes_before_compiling_and_again_from_the_first_steps(trained_run):
    lines = trained_run["lines"]
    reckoned = [i for i, line in enumerate(lines) if line.startswith("no accelerator")]
    compiled = [i for i, line in enumerate(lines) if line.startswith("compiled the train and eval steps")]
    first = [i for i, line in enumerate(lines) if line.startswith("the first training step")]
    refined = [i for i, line in enumerate(lines) if line.startswith("steps 2 to 3")]
    assert len(reckoned) == len(compiled) == len(first) == len(refined) == 1, lines
    epoch_1 = lines.index(next(line for line in lines if line.startswith("epoch 1/2:")))
    assert reckoned[0] < compiled[0] < first[0] < refined[0] < epoch_1
    assert re.fullmatch(r"no accelerator: on this CPU the 2 epochs at 67x67 will take about \d+\.\d (seconds|minutes) "
                        r"\(from the steps' \d\.\d\d GFLOP per training image and this CPU's speed; the first steps will "
                        r"tell\)", lines[reckoned[0]])
    assert re.fullmatch(r"the first training step took \d+\.\ds and an evaluation step \d+\.\ds: the 2 epochs will take "
                        r"about \d+\.\d (seconds|minutes)", lines[first[0]])
    assert re.fullmatch(r"steps 2 to 3 took \d+\.\ds each: the 2 epochs will take about \d+\.\d (seconds|minutes)",
                        lines[refined[0]])
    assert int(trained_run["state"].step) == TRAINED_RUN_CONFIG.num_epochs * 3


@pytest.mark.parametrize("train_s, eval_s, epochs, expected", [(2.0, 0.5, 10, "2.7 hours"), (0.2, 0.0, 1, "1.6 minutes")])
def test_the_estimate_adds_up_train_and_eval_steps_of_every_epoch(train_s, eval_s, epochs, expected):
    config = Config(num_epochs=epochs)  # 469 train and 79 test batches of 128
    assert cpu_estimate.format_duration(cpu_estimate.total_seconds(train_s, eval_s, config, 60_000, 10_000)) == expected


class Lowered:
    def __init__(self, flops):
        self.flops = flops

    def cost_analysis(self):
        return {"flops": self.flops}


@pytest.mark.parametrize("step_gflop, said, hint", [(0.1, False, False), (2.0, True, False), (50.0, True, True)])
def test_a_long_run_is_said_and_an_hours_long_one_gets_the_quick_command(step_gflop, said, hint):
    """At 10 GFLOP/s, 4,690 steps of 0.1 GFLOP take 47 s, unsaid; of 2 GFLOP, 16 minutes; of 50, 6.5 hours."""
    lines = []
    with mock.patch.object(cpu_estimate, "matmul_flops_per_second", return_value=10e9 / cpu_estimate.NIN_SHARE), \
            mock.patch.object(sys, "argv", ["train.py", "--resize", "224"]):
        spoke = cpu_estimate.say_before_compiling((Lowered(step_gflop * 1e9), Lowered(1.0)), Config(), (60_000, 10_000),
                                                  "runs/reference", lines.append)
    assert spoke == said and len(lines) == said
    assert hint == any("A quick run that finishes in minutes:\n" in line for line in lines)


@pytest.mark.parametrize("argv, workdir, expected", [
    (["train.py", "--manual_dir", "D", "--resize", "224", "--workdir", "runs/r"], "runs/r",
     "train.py --manual_dir D --resize 67 --num_epochs 2 --train_examples 19200 --eval_examples 2000 "
     "--workdir runs/r_quick"),
    (["/x/train.py", "--resize=224", "--num_epochs=10", "--recipe", "strong", "--workdir=runs/r/"], "runs/r/",
     "/x/train.py --recipe strong --resize 67 --num_epochs 2 --train_examples 19200 --eval_examples 2000 "
     "--workdir runs/r_quick"),
    (["train.py", "--data_arrays", "my data.npz", "--eval_examples", "500"], None,
     "train.py --data_arrays 'my data.npz' --resize 67 --num_epochs 2 --train_examples 19200 --eval_examples 2000"),
])
def test_the_quick_command_is_the_users_own_with_the_quick_runs_flags_in_a_workdir_of_its_own(argv, workdir, expected):
    assert cpu_estimate.quick_command(argv, workdir) == f"{os.path.basename(sys.executable)} {expected}"


def test_the_estimate_is_for_a_cpu_only():
    with mock.patch.object(cpu_estimate.jax, "default_backend", return_value="gpu"):
        assert not cpu_estimate.applies()
    assert cpu_estimate.applies()


@pytest.mark.slow
def test_the_quick_command_pasted_as_printed_runs_to_its_end(tmp_path):
    """A run of 300 epochs at 224 px (hours on a CPU) prints the quick command before compiling; that
    line, pasted into a shell whose `python` is this environment's, trains and finishes."""
    data, workdir = tmp_path / "arrays.npz", tmp_path / "run"
    random_arrays(data, 1024, 256)
    log_path = tmp_path / "log.txt"
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "JAX_PLATFORMS": "cpu"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "train.py", "--data_arrays", str(data), "--resize", "224",
                                    "--num_epochs", "300", "--workdir", str(workdir)], cwd=REPO_ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "A quick run that finishes in minutes:" in log_path.read_text(), process, log_path)
    finally:
        process.kill()
        process.wait()
    lines = log_path.read_text().splitlines()
    pasted = lines[lines.index(next(line for line in lines if line.endswith("finishes in minutes:"))) + 1].strip()
    assert pasted.startswith("python train.py ") and f"--workdir {workdir}_quick" in pasted, pasted
    result = subprocess.run(pasted, shell=True, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "epoch 2/2: loss" in result.stdout and "Traceback" not in result.stderr
