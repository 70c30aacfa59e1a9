"""`python -m nin_jax.class_maps` (nin_jax/tools/class_maps.py): the maps are the last block's own
output, each map's mean the score that the global average pool gives; on a trained network the map
of the true class lies over the garment; one command draws them; refusals in one line."""

import pathlib
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from nin_jax.config import Config
from nin_jax.run.checkpoints import WorkdirError
from nin_jax.tools import class_maps, predict

from conftest import NEEDS_SHARED_FASHION_MNIST


@pytest.fixture
def maps_run(real_data_run, tmp_path):
    """A copy of conftest's run on the real data, at 131x131 (class maps of 3x3), for a test that
    writes into it: the other test processes read the original."""
    return pathlib.Path(shutil.copytree(real_data_run["workdir"], tmp_path / "run"))


@NEEDS_SHARED_FASHION_MNIST
def test_each_class_map_s_mean_is_the_score_that_the_global_average_pool_gives(real_data_run, data_dir):
    config, variables = predict.restore_variables(str(real_data_run["workdir"]))
    images = predict.test_split(config, data_dir, None).images[:64]
    logits, maps = jax.jit(class_maps.forward_with_maps(config))(variables, images)
    assert maps.shape == (64, 3, 3, 10) and class_maps.map_size(config) == 3
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, jax.jit(predict.forward(config))(variables, images), rtol=1e-5, atol=1e-5)
    assert np.ptp(maps, axis=(1, 2)).max() > 0.1  # maps, not constants: each has a brighter and a darker part


@NEEDS_SHARED_FASHION_MNIST
def test_one_command_draws_16_test_images_and_the_true_class_lies_over_the_garment(maps_run, data_dir, capsys):
    """On most of the first 1,000 test images, the map of the true class is brighter over the
    garment than over the empty background: measured on 831 of 1,000 (docs/exercises.md)."""
    assert class_maps.main([f"--workdir={maps_run}", f"--data_dir={data_dir}", "--class=bag"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("class maps of 3x3 at 131x131 px; on 1,000 test images, accuracy ")
    brighter = int(lines[1].split(" on ")[1].split(" of ")[0].replace(",", ""))
    assert brighter > 700, lines[1]  # most: measured 831
    assert lines[2].startswith("by true class: t-shirt 0.") and lines[2].count(", ") == 9
    assert lines[3] == f"wrote {maps_run / class_maps.CLASS_MAPS_FILE}"
    with Image.open(maps_run / class_maps.CLASS_MAPS_FILE) as image:
        assert image.format == "PNG" and image.width > image.height  # 16 images of two maps: 4 to a row, 4 rows


def test_brighter_over_the_garment_compares_the_garment_with_the_empty_background():
    images = np.zeros((3, 28, 28, 1), np.uint8)
    images[:, 8:20, 8:20] = 200  # a garment in the middle, empty around it
    images[:, 7, 8:20] = 10  # its faint edge, which counts for neither
    maps = np.zeros((3, 28, 28), np.float32)
    maps[0, 8:20, 8:20] = 1.0  # bright over the garment
    maps[1, :4] = 1.0  # bright over the background only
    maps[2] = 1.0  # even
    images_full = np.full((1, 28, 28, 1), 200, np.uint8)  # no background at all
    assert class_maps.brighter_over_garment(images, maps).tolist() == [True, False, False]
    assert class_maps.brighter_over_garment(images_full, np.ones((1, 28, 28))).tolist() == [False]


@NEEDS_SHARED_FASHION_MNIST
def test_a_picture_that_cannot_be_written_is_refused_in_one_line_before_the_test_set_is_read(maps_run, monkeypatch,
                                                                                             capsys):
    (maps_run / class_maps.CLASS_MAPS_FILE).mkdir()
    monkeypatch.setattr(predict, "test_split", lambda *args: pytest.fail("read the test set before checking"))
    with pytest.raises(SystemExit) as end:
        class_maps.main([f"--workdir={maps_run}"])
    assert end.value.code == 1
    assert capsys.readouterr().err == (f"python -m nin_jax.class_maps: error: cannot write "
                                       f"{maps_run / class_maps.CLASS_MAPS_FILE}: Is a directory\n")


def test_a_run_whose_maps_are_one_pixel_is_refused_in_one_line(finished_run, capsys):
    with pytest.raises(SystemExit) as end:
        class_maps.main([f"--workdir={finished_run}"])
    assert end.value.code == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "--resize 67, where its class maps are 1x1" in message
    assert "--resize 99 or more" in message and not (finished_run / class_maps.CLASS_MAPS_FILE).exists()


def test_a_dense_head_has_no_class_maps_to_draw():
    with pytest.raises(WorkdirError, match="dense head .* class maps need a global pool"):
        class_maps.check_run(Config(head="dense", resize=224), "runs/dense")
    class_maps.check_run(Config(head="max", resize=224), "runs/max")  # a global max pool keeps its maps


@pytest.mark.parametrize("flags, message", [
    (["--num_images=0"], "--num_images must be from 1 to 100, got 0"),
    (["--measured=-1"], "--measured must be 0 (all) or positive, got -1"),
    (["--class=hat"], "argument --class: invalid choice: 'hat'"),
])
def test_impossible_flags_are_refused_in_one_line_before_anything_is_read(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as end:
        class_maps.main([f"--workdir={tmp_path / 'never_read'}", *flags])
    assert end.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("python -m nin_jax.class_maps: error: ") and message in error
