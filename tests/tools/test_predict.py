"""`python -m nin_jax.predict` (nin_jax/tools/predict.py): every test example counted once with the
trained parameters, the report, and its refusals in one line."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from nin_jax.tools import predict

from conftest import MOCK_EXAMPLES, SMALL_JOB_EXAMPLES, mock_fashion_mnist


def test_predict_counts_every_test_example_once_with_the_trained_parameters(trained_run):
    workdir = trained_run["workdir"]
    with mock_fashion_mnist(MOCK_EXAMPLES):
        matrix = predict.predict_workdir(workdir, num_images=8)
    assert matrix.shape == (10, 10) and matrix.sum() == MOCK_EXAMPLES
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


def test_predict_on_a_workdir_that_does_not_exist_says_so(tmp_path, capsys):
    """It said that it could not write W/predictions.png."""
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--workdir", str(tmp_path / "typo")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (f"python -m nin_jax.predict: error: --workdir {tmp_path / 'typo'} does not exist; "
                                       f"train a model there first with `python train.py --workdir {tmp_path / 'typo'}`\n")


@pytest.mark.parametrize("tool, required, optional", [("predict", ["--workdir"], "--num_images"),
                                                      ("export", ["--workdir", "--out"], None),
                                                      ("export_arrays", ["--out"], "--data_dir")])
def test_help_gives_the_defaults_and_no_default_of_a_required_flag(tool, required, optional, capsys):
    """predict's --help said '(default: None)' of its required --workdir; export's gave no defaults."""
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"nin_jax.tools.{tool}").main(["--help"])
    shown = capsys.readouterr().out
    help_of = {flag: " ".join(shown[shown.index(f"  {flag} "):].split("\n  --")[0].split()) for flag in required}
    assert not any("default" in text for text in help_of.values()), help_of
    if optional:
        assert "(default: " in shown[shown.index(f"  {optional} "):].split("\n  --")[0]


@pytest.mark.parametrize("num_images", ["0", "-1", "101"])
def test_predict_refuses_a_grid_it_cannot_draw_before_reading_anything(tmp_path, capsys, num_images):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--workdir", str(tmp_path / "never_read"), "--num_images", num_images])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message == (f"python -m nin_jax.predict: error: --num_images must be from 1 to 100, got {num_images} "
                       f"(see --help)\n")


def test_report_lists_per_class_accuracy_and_the_confusion_matrix():
    matrix = np.diag([3, 4]) + np.array([[0, 1], [0, 0]])
    text = predict.format_report(matrix, ("cat", "dog"))
    assert "accuracy on 8 test images: 0.875" in text
    assert re.search(r"0 cat +0\.750  \(3/4\)", text) and re.search(r"1 dog +1\.000  \(4/4\)", text)
    assert re.search(r"0 cat +3 +1$", text, re.MULTILINE) and re.search(r"1 dog +0 +4$", text, re.MULTILINE)


def test_predict_checks_its_picture_can_be_written_before_it_predicts(finished_run, monkeypatch, capsys):
    from nin_jax.tools import predict

    from conftest import fake_fashion_mnist

    (finished_run / predict.PREDICTIONS_FILE).mkdir()
    monkeypatch.setattr(predict, "predict_classes", lambda *args: pytest.fail("predicted before checking the picture"))
    try:
        with fake_fashion_mnist(SMALL_JOB_EXAMPLES), pytest.raises(SystemExit) as end:
            predict.main([f"--workdir={finished_run}"])
    finally:
        (finished_run / predict.PREDICTIONS_FILE).rmdir()
    assert end.value.code == 1
    assert capsys.readouterr().err == (f"python -m nin_jax.predict: error: cannot write "
                                       f"{finished_run / predict.PREDICTIONS_FILE}: Is a directory\n")
