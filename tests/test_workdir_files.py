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
C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}


def fake_run(*args, env=None, cwd=None, timeout=120):
    """tests/fake_data_train.py NUM_EXAMPLES args: train.py, or with `predict` first, the predict command."""
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests", "fake_data_train.py"), str(NUM_EXAMPLES),
                           *args], capture_output=True, timeout=timeout, env={**CPU_ENV, **(env or {})}, cwd=cwd)


def module_run(module, *args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, timeout=timeout,
                          env={**CPU_ENV, **(env or {})}, cwd=REPO_ROOT)


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
    from nin_jax import predict

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
