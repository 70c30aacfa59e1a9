"""What a run leaves in its workdir (nin_jax/run/outputs.py): metrics.jsonl, config.json, the
TensorBoard events and curves.png, and the crafted or damaged ones it reads back."""

import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from nin_jax.run import outputs, plots
from nin_jax.runtime.errors import WorkdirError

from conftest import (ABSURD_SIZE, REPO_ROOT, SMALL_JIT_JOB, SPECIAL_FILES, TRAINED_RUN_CONFIG, fake_run,
                      limited_address_space, make_special_file, module_run, one_line, returns_within)


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
        epoch_outputs = outputs.EpochOutputs(str(tmp_path), TRAINED_RUN_CONFIG)
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
        epoch_outputs = outputs.EpochOutputs(str(tmp_path), TRAINED_RUN_CONFIG)
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
    assert outputs.read_config(trained_run["workdir"]) == TRAINED_RUN_CONFIG


def test_config_json_of_an_earlier_version_reads_back_and_a_foreign_one_is_refused_in_one_line(trained_run,
                                                                                             tmp_path):
    """An earlier version's run recorded options since removed, which predict must not trip over."""
    with open(os.path.join(trained_run["workdir"], outputs.CONFIG_FILE)) as f:
        fields = json.load(f)
    (tmp_path / outputs.CONFIG_FILE).write_text(json.dumps({**fields, "augment": False, "test_time_flips": False}))
    assert outputs.read_config(str(tmp_path)) == TRAINED_RUN_CONFIG
    (tmp_path / outputs.CONFIG_FILE).write_text(json.dumps({**fields, "colour": "red"}))
    with pytest.raises(WorkdirError, match=r"^cannot read the run's flags from .*config.json \(TypeError: .*colour"):
        outputs.read_config(str(tmp_path))


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


def test_crafted_lines_of_metrics_jsonl_are_left_out_with_a_warning_and_the_run_goes_on(tmp_path):
    """A line of metrics.jsonl with `"train_loss": "x"` raised a ValueError after the next epoch
    had trained; so did lines without the fields that the curves and TensorBoard read."""
    import json

    workdir = tmp_path / "run"
    result = fake_run(*SMALL_JIT_JOB, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr.decode()
    record = json.loads((workdir / "metrics.jsonl").read_text())
    crafted = [{**record, "train_loss": "x"}, {"epoch": 1}, {**record, "epoch": True}, {**record, "test_accuracy": [0.5]}]
    lines = [json.dumps(line) for line in crafted] + ["[" * 100_000 + "]" * 100_000]
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = fake_run(*SMALL_JIT_JOB, "--num_epochs=2", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr.decode()
    stdout = result.stdout.decode()
    for number in range(1, len(lines) + 1):
        assert f"warning: {workdir / 'metrics.jsonl'} line {number} is not a whole epoch record; left out" in stdout
    assert [json.loads(line)["epoch"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == [2]
    assert (workdir / "curves.png").is_file()


def test_a_metrics_jsonl_of_absurd_size_is_refused_in_one_line(tmp_path):
    from nin_jax.run import outputs
    from nin_jax.runtime.errors import WorkdirError

    with open(tmp_path / "metrics.jsonl", "wb") as f:
        f.truncate(ABSURD_SIZE)  # sparse: no disk is filled
    with pytest.raises(WorkdirError, match=r"metrics.jsonl is 268,435,456 bytes"):
        outputs.keep_epochs(str(tmp_path), 1)


@pytest.mark.parametrize("crafted", [
    {"keep_checkpoints": {}}, {"resize": "67"}, {"resize": True}, {"dtype": 3}, {"learning_rate": "0.1"},
    {"workdir": [1]}, {"resize": 10}, [1], "[" * 100_000 + "]" * 100_000,
])
def test_a_crafted_config_json_is_refused_in_one_line(finished_run, tmp_path, crafted):
    """`"keep_checkpoints": {}` read by predict or export was a TypeError traceback."""
    import json
    import shutil

    from nin_jax.tools import predict
    from nin_jax.runtime.errors import WorkdirError

    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    fields = json.loads((workdir / "config.json").read_text())
    text = crafted if isinstance(crafted, str) else json.dumps({**fields, **crafted} if isinstance(crafted, dict)
                                                               else crafted)
    (workdir / "config.json").write_text(text)
    with pytest.raises(WorkdirError) as refusal:
        predict.restore_variables(str(workdir))
    assert str(refusal.value).startswith(f"cannot read the run's flags from {workdir / 'config.json'} (")
    assert "\n" not in str(refusal.value)


def test_a_config_json_of_absurd_size_is_refused_in_one_line_without_reading_it(finished_run, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    with open(workdir / "config.json", "wb") as f:
        f.truncate(ABSURD_SIZE)
    result = module_run("nin_jax.export", f"--workdir={workdir}", f"--out={tmp_path / 'nin.jax_exported'}",
                        preexec_fn=limited_address_space)
    assert result.returncode == 1, result.stderr.decode()[-3000:]
    assert one_line(result) == (f"python -m nin_jax.export: error: cannot read the run's flags from "
                                f"{workdir / 'config.json'} (it is 268,435,456 bytes, more than any config.json); "
                                f"it was not written by this version's train.py")


@pytest.mark.parametrize("name, kind", [("metrics.jsonl", "fifo"), ("config.json", "socket"),
                                        ("curves.png", "device")])
def test_a_file_of_the_run_that_is_not_a_regular_file_is_refused_before_training(tmp_path, name, kind):
    """A FIFO at W/metrics.jsonl had blocked train.py for good."""
    make_special_file(tmp_path / name, kind)
    with pytest.raises(WorkdirError) as refusal:
        returns_within(lambda: outputs.check_outputs(str(tmp_path), profile_steps=0))
    assert str(refusal.value) == f"cannot write to --workdir {tmp_path}: {tmp_path / name}: {SPECIAL_FILES[kind]}"


def test_metrics_jsonl_and_config_json_that_are_fifos_are_refused_without_blocking(tmp_path):
    make_special_file(tmp_path / "metrics.jsonl", "fifo")
    make_special_file(tmp_path / "config.json", "fifo")
    with pytest.raises(WorkdirError) as refusal:
        returns_within(lambda: outputs.keep_epochs(str(tmp_path), 1))
    assert str(refusal.value) == (f"cannot read {tmp_path / 'metrics.jsonl'}: Is a FIFO, not a regular file; move it "
                                  f"away and run again")
    with pytest.raises(WorkdirError) as refusal:
        returns_within(lambda: outputs.read_config(str(tmp_path)))
    assert str(refusal.value) == (f"cannot read the run's flags from {tmp_path / 'config.json'} (Is a FIFO, not a "
                                  f"regular file); put the config.json that train.py wrote there")


def test_a_fifo_config_json_beside_checkpoints_is_named_as_the_cause(tmp_path):
    """It was called 'holds no trained model', though the workdir held checkpoints."""
    from nin_jax.tools import predict

    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    make_special_file(tmp_path / "config.json", "fifo")
    with pytest.raises(WorkdirError, match=r"config.json \(Is a FIFO, not a regular file\)"):
        returns_within(lambda: predict.restore_variables(str(tmp_path)))


@pytest.mark.parametrize("link", ["profile", "profile/plugins", "profile/plugins/profile"])
def test_the_profile_folders_are_never_followed_through_a_link_that_leads_out_of_the_workdir(tmp_path, link):
    workdir, outside = tmp_path / "run", tmp_path / "outside"
    (workdir / link).parent.mkdir(parents=True)
    outside.mkdir()
    (workdir / link).symlink_to(outside)
    with pytest.raises(WorkdirError) as refusal:
        outputs.check_outputs(str(workdir), profile_steps=2)
    assert str(refusal.value) == (f"cannot write to --workdir {workdir}: {workdir / link}: Is a link that leads "
                                  f"outside {workdir} (to {outside}), which nin_jax never writes through")
    assert os.listdir(outside) == []
