"""What a run prints as it trains (nin_jax/run/progress.py): step lines and the bar."""

import io
import math
import re
import sys
from unittest import mock

import numpy as np
import pytest

from nin_jax import trainer
from nin_jax.config import Config
from nin_jax.run import progress

from conftest import MOCK_EXAMPLES, TRAINED_RUN_CONFIG, mock_fashion_mnist


def test_step_lines_every_log_every_steps(trained_run):
    step_lines = [line for line in trained_run["lines"] if re.match(r"epoch \d+/\d+ step ", line)]
    assert len(step_lines) == TRAINED_RUN_CONFIG.num_epochs  # step 2 of 3 in each epoch
    for epoch, line in enumerate(step_lines, start=1):
        assert re.fullmatch(rf"epoch {epoch}/2 step 2/3: loss \d+\.\d{{3}}, acc [01]\.\d{{3}}, [\d.]+ images/s so far", line)


def test_the_last_step_line_of_an_epoch_gives_the_epoch_lines_images_per_second(tmp_path):
    """Step lines count images over the epoch so far, checkpoints included, as the epoch line does:
    with a checkpoint after every step they do not report the bursts between two saves."""
    lines = []
    with mock_fashion_mnist(MOCK_EXAMPLES):
        _, records = trainer.train_and_evaluate(
            Config(resize=67, batch_size=8, num_epochs=1, parallel="jit", log_every_steps=1, checkpoint_every_steps=1,
                   compile_cache="off"), str(tmp_path), log=lines.append)
    last_step_line = [line for line in lines if line.startswith("epoch 1/1 step 3/3:")][0]
    step_rate = float(re.search(r"([\d.]+) images/s so far$", last_step_line)[1])
    assert 0.8 < step_rate / records[0]["examples_per_sec"] < 1.25, (last_step_line, records[0])
    assert re.fullmatch(r"epoch 1/1: loss .*, [\d.]+ images/s on 1 cpu device", lines[-1])

    lines.clear()  # the same call again: one epoch, said in the singular
    with mock_fashion_mnist(MOCK_EXAMPLES):
        trainer.train_and_evaluate(Config(resize=67, batch_size=8, num_epochs=1, parallel="jit", compile_cache="off"),
                                   str(tmp_path), log=lines.append)
    assert lines == [f"the run in {tmp_path} is finished: its checkpoint has 1 epoch (3 steps); raise --num_epochs "
                     f"to train on"]


def on_screen(text: str) -> list[str]:
    """The lines a terminal shows for `text`: a carriage return goes back to the line's start."""
    lines = []
    for written in text.split("\n"):
        line = ""
        for part in written.split("\r"):
            line = part + line[len(part):]
        lines.append(line.rstrip())
    return lines


def test_a_bar_left_by_an_exception_leaves_its_line_to_the_message_that_follows(monkeypatch):
    """A stopped run's last line (`train.py: stopped by SIGINT after step 7: ...`) starts a line of
    its own, not the end of the bar's."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with pytest.raises(KeyboardInterrupt), progress.StepProgress("epoch 1/10", 1000, 10) as bar:
        bar.update({"count": np.float32(10), "loss_sum": np.float32(23.0), "correct": np.float32(1)})
        raise KeyboardInterrupt
    assert "epoch 1/10" in terminal.getvalue()  # the bar was drawn
    terminal.write("train.py: stopped by SIGINT after step 1\n")
    assert on_screen(terminal.getvalue())[-2:] == ["train.py: stopped by SIGINT after step 1", ""]


class DeviceClock:
    """A device that runs the steps dispatched to it one after another, `step_seconds` each, on a
    clock of its own: the host's waits for a step move the clock on to the step's end."""

    def __init__(self, step_seconds: float):
        self.now, self.step_seconds, self._free_at = 0.0, step_seconds, 0.0

    def dispatch(self) -> dict:
        self._free_at = max(self._free_at, self.now) + self.step_seconds
        count = mock.Mock(is_ready=lambda done_at=self._free_at: self.now >= done_at)
        count.block_until_ready.side_effect = lambda done_at=self._free_at: setattr(self, "now", max(self.now, done_at))
        return {"count": count}

    def in_flight(self) -> int:
        """How many steps dispatched are not done."""
        return math.ceil(round((self._free_at - self.now) / self.step_seconds, 6))


def test_steps_that_a_checkpoint_waited_for_leave_the_steps_in_flight_within_about_two_seconds(monkeypatch):
    """Steps of 0.9 s and a checkpoint every 10 steps, which waits for the steps in flight: the bar
    then found two steps done at once, took a step for 0 s and let 8 steps queue up, 7 s of them,
    which a stop asked for then waited for before it saved."""
    device = DeviceClock(0.9)
    monkeypatch.setattr(progress.time, "perf_counter", lambda: device.now)
    in_flight = []
    with progress.StepProgress("epoch 1/1", 8 * 40, 8) as bar:
        for step in range(1, 41):
            totals = device.dispatch()
            bar.update(totals)
            in_flight.append(device.in_flight())
            if step % 10 == 0:  # hooks.SaveOrStop
                totals["count"].block_until_ready()
    assert max(in_flight) <= 2, in_flight  # int(IN_FLIGHT_SECONDS / 0.9)
