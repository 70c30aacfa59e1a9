"""What people coming from the book see: --summary, step lines, curves.png, TensorBoard events,
the CPU estimate and the predict command, on tfds' mock data."""

import io
import json
import os
import re
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from nin_jax.run import cpu_estimate, outputs, plots, progress
from nin_jax.tools import predict
from nin_jax import trainer
from nin_jax.config import Config
from nin_jax.runtime.errors import WorkdirError

from conftest import REPO_ROOT, mock_fashion_mnist
from test_train import run_cli

NUM_EXAMPLES = 20  # per split: 3 steps of 8 per epoch, the last one padded
CONFIG = Config(resize=67, batch_size=8, num_epochs=2, parallel="jit", log_every_steps=2)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short run, with the CPU estimate switched on at its small resize; it leaves checkpoints."""
    workdir = str(tmp_path_factory.mktemp("run"))
    lines = []
    with mock_fashion_mnist(NUM_EXAMPLES), pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_estimate, "ESTIMATE_FROM_RESIZE", CONFIG.resize)
        state, records = trainer.train_and_evaluate(CONFIG, workdir, log=lines.append)
    return {"workdir": workdir, "state": state, "records": records, "lines": lines}


def test_summary_flag_prints_the_layers_and_exits_without_data():
    result = run_cli("--summary", "--resize", "96", "--data_dir", "/nonexistent")
    assert result.returncode == 0, result.stderr
    assert "(NHWC)" in result.stdout
    assert re.search(r"^block1 +\(1, 22, 22, 96\) +30,336$", result.stdout, re.MULTILINE)
    assert re.search(r"^flatten +\(1, 10\) +0$", result.stdout, re.MULTILINE)
    assert re.search(r"^total +1,992,166$", result.stdout, re.MULTILINE)
    assert "compiled" not in result.stdout and "epoch" not in result.stdout


def test_step_lines_every_log_every_steps(trained_run):
    step_lines = [line for line in trained_run["lines"] if re.match(r"epoch \d+/\d+ step ", line)]
    assert len(step_lines) == CONFIG.num_epochs  # step 2 of 3 in each epoch
    for epoch, line in enumerate(step_lines, start=1):
        assert re.fullmatch(rf"epoch {epoch}/2 step 2/3: loss \d+\.\d{{3}}, acc [01]\.\d{{3}}, [\d.]+ images/s so far", line)


def test_the_last_step_line_of_an_epoch_gives_the_epoch_lines_images_per_second(tmp_path):
    """Step lines count images over the epoch so far, checkpoints included, as the epoch line does:
    with a checkpoint after every step they do not report the bursts between two saves."""
    lines = []
    with mock_fashion_mnist(NUM_EXAMPLES):
        _, records = trainer.train_and_evaluate(
            Config(resize=67, batch_size=8, num_epochs=1, parallel="jit", log_every_steps=1, checkpoint_every_steps=1,
                   compile_cache="off"), str(tmp_path), log=lines.append)
    last_step_line = [line for line in lines if line.startswith("epoch 1/1 step 3/3:")][0]
    step_rate = float(re.search(r"([\d.]+) images/s so far$", last_step_line)[1])
    assert 0.8 < step_rate / records[0]["examples_per_sec"] < 1.25, (last_step_line, records[0])
    assert re.fullmatch(r"epoch 1/1: loss .*, [\d.]+ images/s on 1 cpu device", lines[-1])

    lines.clear()  # the same call again: one epoch, said in the singular
    with mock_fashion_mnist(NUM_EXAMPLES):
        trainer.train_and_evaluate(Config(resize=67, batch_size=8, num_epochs=1, parallel="jit", compile_cache="off"),
                                   str(tmp_path), log=lines.append)
    assert lines == [f"the run in {tmp_path} is finished: its checkpoint has 1 epoch (3 steps); raise --num_epochs "
                     f"to train on"]


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
    assert int(trained_run["state"].step) == CONFIG.num_epochs * 3


def test_curves_png_is_written(trained_run):
    with Image.open(os.path.join(trained_run["workdir"], outputs.CURVES_FILE)) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 150


@pytest.mark.parametrize("num_epochs, ticks", [(1, [1]), (3, [1, 2, 3])])
def test_the_curves_epoch_axis_spans_exactly_the_runs_epochs(trained_run, num_epochs, ticks):
    records = [{**trained_run["records"][0], "epoch": epoch} for epoch in range(1, num_epochs + 1)]
    axes = plots.curves_figure(records, num_epochs).axes[0]
    low, high = axes.get_xlim()
    assert [tick for tick in axes.get_xticks() if low <= tick <= high] == ticks
    assert low <= 1 and high >= num_epochs and high - low <= max(num_epochs - 1, 1)


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


def logged_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar in the TensorBoard events of `logdir`, read as TensorBoard reads them."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    events = event_accumulator.EventAccumulator(logdir)
    events.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"]}


def expected_scalars(records) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(r["epoch"], r[key]) for r in records] for tag, key in outputs.SCALARS.items()}


def test_tensorboard_events_hold_every_scalar_of_every_epoch(trained_run):
    logged = logged_scalars(trained_run["workdir"])
    assert set(logged) == set(outputs.SCALARS)
    for tag, expected in expected_scalars(trained_run["records"]).items():
        np.testing.assert_allclose(logged[tag], expected, rtol=1e-6)


def test_events_are_written_without_tensorflow(trained_run, tmp_path):
    """As on an accelerator machine that reads --data_arrays and has no TensorFlow."""
    with mock.patch.dict(sys.modules, {"tensorflow": None}):  # None: `import tensorflow` fails, as when absent
        epoch_outputs = outputs.EpochOutputs(str(tmp_path), CONFIG)
        epoch_outputs.write(trained_run["records"][:1])
        epoch_outputs.write(trained_run["records"])
        epoch_outputs.close()
    assert outputs.CURVES_FILE in os.listdir(tmp_path)
    logged = logged_scalars(str(tmp_path))
    assert logged.keys() == expected_scalars(trained_run["records"]).keys()
    for tag, expected in expected_scalars(trained_run["records"]).items():
        np.testing.assert_allclose(logged[tag], expected, rtol=1e-6)


def test_writing_events_leaves_tensorflow_unimported(tmp_path):
    """Importing TensorFlow takes seconds of every start; the events need none of it."""
    script = (f"import sys; from nin_jax.run import outputs; events = outputs.ScalarEvents({str(tmp_path)!r}); "
              "events.write({'train/loss': 1.5}, 1); events.close(); print(sorted(sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert "'tensorflow'" not in result.stdout and "'tensorboard'" in result.stdout
    assert logged_scalars(str(tmp_path)) == {"train/loss": [(1, 1.5)]}


def test_without_the_tensorboard_package_the_curves_are_drawn_and_the_events_left_out(trained_run, tmp_path):
    with mock.patch.dict(sys.modules, {"tensorboard.summary.writer.record_writer": None}):
        epoch_outputs = outputs.EpochOutputs(str(tmp_path), CONFIG)
        epoch_outputs.write(trained_run["records"])
        epoch_outputs.close()
    assert os.listdir(tmp_path) == [outputs.CURVES_FILE]


def test_the_first_epochs_run_without_a_drawing_beside_them_and_the_last_is_drawn(trained_run, tmp_path):
    """On a fast device a drawing of curves.png beside an epoch slowed it (the H200's epoch 2 ran
    13% slower than the others): the first redraw waits as long as the later ones, matplotlib is
    imported before training, and closing draws every epoch."""
    script = f"""
import sys, time
from nin_jax.run import outputs
from nin_jax.config import Config
outputs = outputs.EpochOutputs({str(tmp_path)!r}, Config())
outputs._jobs.wait()
imported = 'matplotlib' in sys.modules
outputs.write({trained_run["records"][:1]!r})
outputs._jobs.wait()
drawn_after_first_epoch = {outputs.CURVES_FILE!r} in __import__('os').listdir({str(tmp_path)!r})
outputs.close()
print(imported, drawn_after_first_epoch)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]
    assert outputs.CURVES_FILE in os.listdir(tmp_path)


def test_config_json_reads_back_as_the_run_config(trained_run):
    assert outputs.read_config(trained_run["workdir"]) == CONFIG


def test_config_json_of_an_earlier_version_reads_back_and_a_foreign_one_is_refused_in_one_line(trained_run,
                                                                                             tmp_path):
    """An earlier version's run recorded options since removed, which predict must not trip over."""
    with open(os.path.join(trained_run["workdir"], outputs.CONFIG_FILE)) as f:
        fields = json.load(f)
    (tmp_path / outputs.CONFIG_FILE).write_text(json.dumps({**fields, "augment": False, "test_time_flips": False}))
    assert outputs.read_config(str(tmp_path)) == CONFIG
    (tmp_path / outputs.CONFIG_FILE).write_text(json.dumps({**fields, "colour": "red"}))
    with pytest.raises(WorkdirError, match=r"^cannot read the run's flags from .*config.json \(TypeError: .*colour"):
        outputs.read_config(str(tmp_path))


def test_predict_counts_every_test_example_once_with_the_trained_parameters(trained_run):
    workdir = trained_run["workdir"]
    with mock_fashion_mnist(NUM_EXAMPLES):
        matrix = predict.predict_workdir(workdir, num_images=8)
    assert matrix.shape == (10, 10) and matrix.sum() == NUM_EXAMPLES
    # eval_examples=0: the run's last evaluation saw the same 20 test images with the same parameters.
    assert np.trace(matrix) / matrix.sum() == pytest.approx(trained_run["records"][-1]["test_accuracy"])
    with Image.open(os.path.join(workdir, predict.PREDICTIONS_FILE)) as image:
        assert image.format == "PNG"


def test_predict_without_a_checkpoint_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--workdir", str(tmp_path)])
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "holds no trained model" in message and "train.py --workdir" in message


@pytest.mark.parametrize("num_images", ["0", "-1", "101"])
def test_predict_refuses_a_grid_it_cannot_draw_before_reading_anything(tmp_path, capsys, num_images):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--workdir", str(tmp_path / "never_read"), "--num_images", num_images])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message == (f"python -m nin_jax.predict: error: --num_images must be from 1 to 100, got {num_images} "
                       f"(see --help)\n")


def test_a_torn_last_line_of_metrics_jsonl_is_left_out_with_a_warning_and_the_rest_kept(tmp_path):
    scalars = {key: 0.5 for key in outputs.SCALARS.values()}
    whole = [json.dumps({"epoch": epoch, **scalars}) + "\n" for epoch in (1, 2)]
    (tmp_path / outputs.METRICS_FILE).write_text("".join(whole) + '{"epoch": 3, "test_acc')
    warnings = []
    assert outputs.keep_epochs(str(tmp_path), 3, warnings.append) == [json.loads(line) for line in whole]
    assert warnings == [f"warning: {tmp_path / outputs.METRICS_FILE} line 3 is not a whole epoch record; left out"]
    assert (tmp_path / outputs.METRICS_FILE).read_text() == "".join(whole)
    outputs.append_metrics(str(tmp_path), {"epoch": 3, **scalars})
    assert outputs.read_metrics(str(tmp_path))[-1] == {"epoch": 3, **scalars}
    assert sorted(os.listdir(tmp_path)) == [outputs.METRICS_FILE]  # no temporary left


def test_report_lists_per_class_accuracy_and_the_confusion_matrix():
    matrix = np.diag([3, 4]) + np.array([[0, 1], [0, 0]])
    text = predict.format_report(matrix, ("cat", "dog"))
    assert "accuracy on 8 test images: 0.875" in text
    assert re.search(r"0 cat +0\.750  \(3/4\)", text) and re.search(r"1 dog +1\.000  \(4/4\)", text)
    assert re.search(r"0 cat +3 +1$", text, re.MULTILINE) and re.search(r"1 dog +0 +4$", text, re.MULTILINE)


@pytest.mark.parametrize("train_s, eval_s, epochs, expected",
                         [(2.0, 0.5, 10, "10 epochs of 469 steps will take about 2.7 hours;"),
                          (0.2, 0.0, 1, "1 epoch of 469 steps will take about 1.6 minutes;")])
def test_estimate_adds_up_train_and_eval_steps_of_every_epoch(train_s, eval_s, epochs, expected):
    config = Config(num_epochs=epochs)  # 469 train and 79 test batches of 128
    assert expected in cpu_estimate.estimate_line(train_s, eval_s, config, 60_000, 10_000)


def test_estimate_only_for_the_reference_resolution_on_a_cpu():
    assert cpu_estimate.applies(Config(resize=224))
    assert not cpu_estimate.applies(Config(resize=96))
