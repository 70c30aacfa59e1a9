"""How long a run will take on a CPU (nin_jax/run/cpu_estimate.py), said before the first epoch ends."""

import re

import pytest

from nin_jax.config import Config
from nin_jax.run import cpu_estimate

from conftest import TRAINED_RUN_CONFIG


def test_cpu_estimate_comes_from_the_first_steps_and_before_the_first_epoch_ends(trained_run):
    lines = trained_run["lines"]
    compiled = [i for i, line in enumerate(lines) if line.startswith("compiled the train and eval steps")]
    first = [i for i, line in enumerate(lines) if line.startswith("no accelerator")]
    refined = [i for i, line in enumerate(lines) if line.startswith("steps 2 to 3")]
    assert len(compiled) == len(first) == len(refined) == 1, lines
    assert compiled[0] < first[0] < refined[0] < min(i for i, line in enumerate(lines) if line.startswith("epoch 1/2"))
    assert re.fullmatch(r"no accelerator: on this CPU the first training step at 67x67 took \d+\.\ds and an evaluation "
                        r"step \d+\.\ds, so 2 epochs of 3 steps will take about \d+\.\d (seconds|minutes); for a quick "
                        r"run try --resize 96 --num_epochs 2", lines[first[0]])
    assert re.fullmatch(r"steps 2 to 3 took \d+\.\ds each: the 2 epochs will take about \d+\.\d (seconds|minutes)",
                        lines[refined[0]])
    assert int(trained_run["state"].step) == TRAINED_RUN_CONFIG.num_epochs * 3


@pytest.mark.parametrize("train_s, eval_s, epochs, expected",
                         [(2.0, 0.5, 10, "10 epochs of 469 steps will take about 2.7 hours;"),
                          (0.2, 0.0, 1, "1 epoch of 469 steps will take about 1.6 minutes;")])
def test_estimate_adds_up_train_and_eval_steps_of_every_epoch(train_s, eval_s, epochs, expected):
    config = Config(num_epochs=epochs)  # 469 train and 79 test batches of 128
    assert expected in cpu_estimate.estimate_line(train_s, eval_s, config, 60_000, 10_000)


def test_estimate_only_for_the_reference_resolution_on_a_cpu():
    assert cpu_estimate.applies(Config(resize=224))
    assert not cpu_estimate.applies(Config(resize=96))
