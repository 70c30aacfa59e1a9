"""What a run finds in its workdir and its paths: every place it writes is checked before it
trains, a path that this process cannot hand to orbax is refused before anything starts, and
every file it reads back (metrics.jsonl, config.json, a checkpoint's metadata), however crafted,
is read or refused in one line."""

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

NUM_EXAMPLES = 64
SMALL_JOB = ["--resize=67", "--batch_size=8", "--num_epochs=1", "--train_examples=16", "--eval_examples=8",
             "--parallel=jit", "--compile_cache=off"]
CPU_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
ABSURD_SIZE = 2**28  # of a crafted file, made sparse: no disk is filled
C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}


def fake_run(*args, env=None, cwd=None, timeout=120):
    """tests/fake_data_train.py NUM_EXAMPLES args: train.py, or with `predict` first, the predict command."""
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests", "fake_data_train.py"), str(NUM_EXAMPLES),
                           *args], capture_output=True, timeout=timeout, env={**CPU_ENV, **(env or {})}, cwd=cwd)


def module_run(module, *args, env=None, timeout=120, **kwargs):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, timeout=timeout,
                          env={**CPU_ENV, **(env or {})}, cwd=REPO_ROOT, **kwargs)


def one_line(result) -> str:
    """The single line a refused command wrote on stderr (bytes: a C locale writes escapes)."""
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    assert len(lines) == 1, result.stderr.decode(errors="replace")
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Paths in any encoding.

@pytest.fixture(scope="module")
def non_ascii_run(tmp_path_factory):
    """A finished run in a folder named in UTF-8, trained under a UTF-8 locale."""
    workdir = tmp_path_factory.mktemp("runs") / "lauf-\N{LATIN SMALL LETTER U WITH DIAERESIS}"
    result = fake_run(*SMALL_JOB, f"--workdir={workdir}", env={"LC_ALL": "C.UTF-8"})
    assert result.returncode == 0, result.stderr.decode()
    return workdir


def test_a_non_ascii_workdir_under_a_c_locale_is_refused_in_one_line_never_called_damaged(non_ascii_run, tmp_path):
    """Under LC_ALL=C without UTF-8 mode, Python holds a non-ASCII path as undecodable bytes, which
    orbax and tensorstore cannot take: the run is refused before anything is read or written,
    not trained and then unsaved, and its good checkpoint is not called damaged."""
    before = sorted(os.listdir(non_ascii_run / "checkpoints"))
    result = fake_run(*SMALL_JOB, "--num_epochs=2", f"--workdir={non_ascii_run}", env=C_LOCALE)
    assert result.returncode == 2, result.stderr.decode()
    line = one_line(result)
    assert line.startswith("fake_data_train.py: error: --workdir ") and "damaged" not in line
    assert "UTF-8" in line and "LC_ALL=C.UTF-8" in line, line
    assert sorted(os.listdir(non_ascii_run / "checkpoints")) == before

    fresh = tmp_path / "neu-\N{LATIN SMALL LETTER U WITH DIAERESIS}"
    result = fake_run(*SMALL_JOB, f"--workdir={fresh}", env=C_LOCALE)
    assert result.returncode == 2 and "--workdir " in one_line(result)
    assert not fresh.exists()  # refused before training, so no epoch was trained and lost


@pytest.mark.parametrize("command", ["predict", "export"])
def test_predict_and_export_refuse_such_a_workdir_in_one_line(non_ascii_run, tmp_path, command):
    if command == "predict":
        result = fake_run("predict", f"--workdir={non_ascii_run}", env=C_LOCALE)
    else:
        result = module_run("nin_jax.export", f"--workdir={non_ascii_run}", f"--out={tmp_path / 'nin.jax_exported'}",
                            env=C_LOCALE)
    assert result.returncode == 2, result.stderr.decode()
    line = one_line(result)
    assert "error: --workdir " in line and "UTF-8" in line and "damaged" not in line, line


def test_the_same_workdir_under_a_utf8_locale_resumes(non_ascii_run):
    result = fake_run(*SMALL_JOB, "--num_epochs=2", f"--workdir={non_ascii_run}", env={"LC_ALL": "C.UTF-8"})
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().startswith("resuming from the checkpoint of step 2 ")


# ---------------------------------------------------------------------------------------------
# Every place a run writes, checked before it trains.

@pytest.mark.parametrize("name, make, flags, reason", [
    ("profile", "file", ["--profile_steps=3"], "File exists"),
    ("metrics.jsonl", "folder", [], "Is a directory"),
    ("config.json", "folder", [], "Is a directory"),
    ("curves.png", "folder", [], "Is a directory"),
])
def test_an_output_that_cannot_be_written_ends_the_run_before_training_in_one_line(tmp_path, name, make, flags, reason):
    """As a file where W/checkpoints goes always did: `W/profile` as a file ended the run with two
    JaxRuntimeError tracebacks after steps had trained, and nothing was saved."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / name).mkdir() if make == "folder" else (workdir / name).write_text("in the way")
    result = fake_run(*SMALL_JOB, f"--workdir={workdir}", *flags)
    assert result.returncode == 1, result.stderr.decode()
    assert result.stderr.decode() == (f"fake_data_train.py: error: cannot write to --workdir {workdir}: "
                                      f"{workdir / name}: {reason}\n")
    assert result.stdout.decode() == ""  # nothing compiled, nothing trained
    assert not [step for step in os.listdir(workdir / "checkpoints") if step.isdigit()]



@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished") / "run"
    result = fake_run(*SMALL_JOB, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr.decode()
    return workdir


def test_predict_checks_its_picture_can_be_written_before_it_predicts(finished_run, monkeypatch, capsys):
    from nin_jax.tools import predict

    from conftest import fake_fashion_mnist

    (finished_run / predict.PREDICTIONS_FILE).mkdir()
    monkeypatch.setattr(predict, "predict_classes", lambda *args: pytest.fail("predicted before checking the picture"))
    try:
        with fake_fashion_mnist(NUM_EXAMPLES), pytest.raises(SystemExit) as end:
            predict.main([f"--workdir={finished_run}"])
    finally:
        (finished_run / predict.PREDICTIONS_FILE).rmdir()
    assert end.value.code == 1
    assert capsys.readouterr().err == (f"python -m nin_jax.predict: error: cannot write "
                                       f"{finished_run / predict.PREDICTIONS_FILE}: Is a directory\n")


# ---------------------------------------------------------------------------------------------
# Files the project reads back, crafted or edited.

def test_crafted_lines_of_metrics_jsonl_are_left_out_with_a_warning_and_the_run_goes_on(tmp_path):
    """A line of metrics.jsonl with `"train_loss": "x"` raised a ValueError after the next epoch
    had trained; so did lines without the fields that the curves and TensorBoard read."""
    import json

    workdir = tmp_path / "run"
    result = fake_run(*SMALL_JOB, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr.decode()
    record = json.loads((workdir / "metrics.jsonl").read_text())
    crafted = [{**record, "train_loss": "x"}, {"epoch": 1}, {**record, "epoch": True}, {**record, "test_accuracy": [0.5]}]
    lines = [json.dumps(line) for line in crafted] + ["[" * 100_000 + "]" * 100_000]
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = fake_run(*SMALL_JOB, "--num_epochs=2", f"--workdir={workdir}")
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
                        preexec_fn=lambda: __import__("resource").setrlimit(
                            __import__("resource").RLIMIT_AS, (4 * 2**30, 4 * 2**30)))
    assert result.returncode == 1, result.stderr.decode()[-3000:]
    assert one_line(result) == (f"python -m nin_jax.export: error: cannot read the run's flags from "
                                f"{workdir / 'config.json'} (it is 268,435,456 bytes, more than any config.json); "
                                f"it was not written by this version's train.py")


RUN_METADATA = "checkpoints/2/run/metadata"
STEP_METADATA = "checkpoints/2/_CHECKPOINT_METADATA"


@pytest.mark.parametrize("path, craft", [
    (RUN_METADATA, lambda run: [1]),
    (RUN_METADATA, lambda run: {**run, "config": [1]}),
    (RUN_METADATA, lambda run: {key: value for key, value in run.items() if key != "config"}),
    (RUN_METADATA, lambda run: {**run, "epoch_seconds": "x"}),
    (RUN_METADATA, lambda run: {**run, "epoch_seconds": -1}),
    (RUN_METADATA, lambda run: {**run, "fingerprint": 3}),
    (STEP_METADATA, lambda meta: {**meta, "init_timestamp_nsecs": "x"}),
    (STEP_METADATA, lambda meta: {**meta, "item_handlers": [1]}),
    (STEP_METADATA, lambda meta: {**meta, "metrics": [1]}),
    (STEP_METADATA, lambda meta: "[" * 100_000 + "]" * 100_000),
    (STEP_METADATA, None),  # absurd size
])
def test_crafted_checkpoint_metadata_is_called_damaged_in_one_line(finished_run, tmp_path, path, craft):
    """Wrong types, missing keys, absurd nesting or size in a checkpoint's metadata: the resume is
    refused in one line, never a traceback, never a resume with a made-up config."""
    import json
    import shutil

    from nin_jax import steps
    from nin_jax.run.checkpoints import Checkpoints
    from nin_jax.runtime.errors import WorkdirError
    from nin_jax.run.outputs import read_config

    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    if craft is None:
        with open(workdir / path, "wb") as f:
            f.truncate(ABSURD_SIZE)
    else:
        crafted = craft(json.loads((workdir / path).read_text()))
        (workdir / path).write_text(crafted if isinstance(crafted, str) else json.dumps(crafted))
    config = read_config(str(workdir))
    with pytest.raises(WorkdirError) as refusal:
        with Checkpoints(str(workdir), config, read_only=True) as checkpoints:
            checkpoints.restore_latest(steps.create_train_state(config, steps_per_epoch=2))
    assert str(refusal.value).startswith(f"refusing to resume from the checkpoint {workdir / 'checkpoints' / '2'}: "
                                         f"its files are incomplete or damaged ("), str(refusal.value)
