"""Where a trained NiN found each class: the last block's class maps, drawn over the test images.

    python -m nin_jax.class_maps --workdir runs/reference

NiN's last block emits one map per class, and the global average pool turns each map into that
class's score, its mean: no fully connected layer mixes them. So each map shows where the network
found its class (the class activation maps of Zhou et al., CVPR 2016, which need such a head).
Writes <workdir>/class_maps.png: each test image with the map of its predicted class (and of each
--class asked for) upsampled onto it; prints on how many test images the map of the true class is
brighter over the garment than over the background.
"""

import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nin_jax import input_pipeline, models, steps
from nin_jax.config import Config
from nin_jax.run import plots
from nin_jax.run.checkpoints import WorkdirError
from nin_jax.runtime import files
from nin_jax.tools import predict

CLASS_MAPS_FILE = "class_maps.png"
CLASS_BLOCK = "block4"  # models.NiN's last block, whose channels are the class maps
# A pixel of at least a tenth of full brightness is the garment's; one of 0, the empty background's
# (the faint edge between is neither).
GARMENT_LEVEL = 26
MEASURED = 1000  # test images on which the maps are measured, by default
# Where the cells of a class map lie in the resized image: the stem's stride of 4 and the three
# pools' 2 put them 32 pixels apart, and the first one's field (the stem's 11 pixels, each pool's 3)
# is centred on pixel 33, whatever the size.
CELL_STRIDE, FIRST_CELL = 32, 33


def map_size(config: Config) -> int:
    """The side of the class maps of the run's network at its `--resize`: 1 below 99, 5 at the book's 224."""
    rows = models.layer_summary(steps.create_model(config), config.resize)
    return next(shape for name, shape, _ in rows if name == CLASS_BLOCK)[1]


def check_run(config: Config, workdir: str) -> None:
    """Refuses a run whose class maps show nothing: a dense head, or maps of one pixel."""
    if config.head == "dense":
        raise WorkdirError(f"the run in {workdir} has a dense head (--head dense), which mixes the class maps: "
                           f"class maps need a global pool (--head avg, the book's, or max)")
    side = map_size(config)
    if side == 1:
        raise WorkdirError(f"the run in {workdir} was trained at --resize {config.resize}, where its class maps "
                           f"are 1x1 (one pixel each, the score itself): class maps need a run at --resize 99 or "
                           f"more (2x2; 131: 3x3, the first with a centre; the book's 224: 5x5)")


def forward_with_maps(config: Config) -> Callable:
    """The evaluation forward pass, `(logits, maps)(variables, images)`: uint8 images [B, 28, 28, 1]
    in, float32 logits [B, classes] and the class maps [B, side, side, classes] that the head turned
    into them out, from one pass (the maps are the last block's output, sown by the model)."""
    model = steps.create_model(config)

    def logits_and_maps(variables, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        images = steps.preprocess(images, config.resize, jnp.dtype(config.dtype))
        logits, state = model.apply(variables, images, mutable=["intermediates"])
        (maps,) = next(value for key, value in state["intermediates"].items() if key.endswith(f"_{CLASS_BLOCK}"))
        return logits.astype(jnp.float32), maps.astype(jnp.float32)

    return logits_and_maps


def upsampled(maps: np.ndarray, resize: int, size: int = input_pipeline.IMAGE_SHAPE[0]) -> np.ndarray:
    """Maps [B, side, side, C] laid onto the images [size, size] that were resized to `resize`: each
    cell at the centre of the part of the image it sees (FIRST_CELL, CELL_STRIDE), bilinear between
    the centres and constant beyond them, where the network's valid windows left the edges out."""
    pixels = (np.arange(size) + 0.5) * resize / size - 0.5  # each image pixel's centre in the resized image
    cells = np.clip((pixels - FIRST_CELL) / CELL_STRIDE, 0, maps.shape[1] - 1)
    low = np.floor(cells).astype(int)
    high, weight = np.minimum(low + 1, maps.shape[1] - 1), cells - low
    spread = np.zeros((size, maps.shape[1]), np.float32)  # [pixel, cell]: the weight of each cell at each pixel
    np.add.at(spread, (np.arange(size), low), 1 - weight)
    np.add.at(spread, (np.arange(size), high), weight)
    return np.einsum("ph,bhwc,qw->bpqc", spread, np.asarray(maps, np.float32), spread)


def brighter_over_garment(images: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Per image [28, 28, 1], whether its map [28, 28] is brighter on average over the garment than
    over the empty background (GARMENT_LEVEL); False where the image lacks either."""
    garment, background = images[..., 0] >= GARMENT_LEVEL, images[..., 0] == 0
    over_garment = (maps * garment).sum((1, 2)) / np.maximum(garment.sum((1, 2)), 1)
    over_background = (maps * background).sum((1, 2)) / np.maximum(background.sum((1, 2)), 1)
    return (over_garment > over_background) & garment.any((1, 2)) & background.any((1, 2))


def measure(config: Config, variables, split: input_pipeline.Split, batch_size: int) -> dict[str, np.ndarray]:
    """Over every image of `split`: whether the prediction is right, and whether the map of the true
    class is brighter over the garment than over the background."""
    logits_and_maps = jax.jit(forward_with_maps(config))
    correct, brighter = [], []
    for batch in input_pipeline.eval_batches(split, batch_size):
        logits, maps = logits_and_maps(variables, batch["image"])
        true_maps = upsampled(maps, config.resize)[np.arange(len(batch["label"])), ..., batch["label"]]
        real = batch["mask"].astype(bool)
        correct.append((np.argmax(logits, -1) == batch["label"])[real])
        brighter.append(brighter_over_garment(batch["image"], true_maps)[real])
    return {"correct": np.concatenate(correct), "brighter": np.concatenate(brighter), "labels": split.labels}


def draw(config: Config, variables, shown: input_pipeline.Split, classes: Sequence[int], path: str) -> None:
    """Writes the picture of `shown`'s images, each with the map of its predicted class and of `classes`."""
    logits, maps = jax.jit(forward_with_maps(config))(variables, shown.images)
    predictions = np.argmax(logits, -1)
    maps = upsampled(maps, config.resize)
    panels = [[(prediction, maps[index, ..., prediction])] + [(name, maps[index, ..., name]) for name in classes]
              for index, prediction in enumerate(predictions)]
    plots.plot_class_maps(shown.images, shown.labels, predictions, panels, input_pipeline.CLASS_NAMES, path)


def class_maps_workdir(workdir: str, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                       num_images: int = 16, classes: Sequence[int] = (), measured: int = MEASURED) -> dict:
    """Writes <workdir>/class_maps.png for the first `num_images` test images; returns the
    measures of the first `measured` test images (0: all), with the side of the maps."""
    config, variables = predict.restore_variables(workdir)
    check_run(config, workdir)
    files.check_writable(os.path.join(workdir, CLASS_MAPS_FILE))  # before the test set is read
    test = predict.test_split(config, data_dir, manual_dir)
    draw(config, variables, test.take(num_images), classes, os.path.join(workdir, CLASS_MAPS_FILE))
    return {**measure(config, variables, test.take(measured or len(test)), config.batch_size),
            "side": map_size(config), "resize": config.resize}


def format_report(result: dict) -> str:
    """What the maps show, in three lines: the accuracy, and how often the map of the true class lies
    over the garment, of all the images and of each class's."""
    brighter, count = int(result["brighter"].sum()), len(result["brighter"])
    by_class = ", ".join(f"{name} {result['brighter'][result['labels'] == label].mean():.2f}"
                         for label, name in enumerate(input_pipeline.CLASS_NAMES) if np.any(result["labels"] == label))
    return (f"class maps of {result['side']}x{result['side']} at {result['resize']}x{result['resize']} px; on "
            f"{count:,} test images, accuracy {result['correct'].mean():.3f}\nthe map of the true class is brighter "
            f"over the garment than over the empty background on {brighter:,} of them ({brighter / count:.3f})\n"
            f"by true class: {by_class}")


def main(argv=None) -> int:
    parser = predict.run_parser("python -m nin_jax.class_maps", __doc__.split("\n\n")[0], num_images=16)
    parser.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME",
                        choices=input_pipeline.CLASS_NAMES, help="also draw this class's map beside each image "
                        "(give it again for several): " + ", ".join(input_pipeline.CLASS_NAMES))
    parser.add_argument("--measured", type=int, default=MEASURED,
                        help="test images on which the maps are measured (0 = all 10,000)")
    args = predict.parse_run_flags(parser, argv)
    if args.measured < 0:
        parser.error(f"--measured must be 0 (all) or positive, got {args.measured}")
    classes = [input_pipeline.CLASS_NAMES.index(name) for name in args.classes]
    result = predict.in_one_line(parser, lambda: class_maps_workdir(
        args.workdir, args.data_dir, args.manual_dir, args.num_images, classes, args.measured))
    print(format_report(result))
    print(f"wrote {os.path.join(args.workdir, CLASS_MAPS_FILE)}")
    return 0
