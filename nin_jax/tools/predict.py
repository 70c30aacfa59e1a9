"""What a trained NiN predicts: the book's `predict_ch3` grid, and per-class accuracy and the
confusion matrix over every test example.

    python -m nin_jax.predict --workdir runs/quick

writes <workdir>/predictions.png (test images titled true class over predicted class, mistakes
in red) and prints the accuracy of each class and the confusion matrix.
"""

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from nin_jax.runtime import commands, errors, files
from nin_jax.data import dataset
from nin_jax import input_pipeline, steps
from nin_jax.run import outputs as run_outputs, plots
from nin_jax.run.checkpoints import Checkpoints, WorkdirError
from nin_jax.config import Config, FlagParser

PREDICTIONS_FILE = "predictions.png"

Variables = Any


def restore_variables(workdir: str) -> tuple[Config, Variables]:
    """The run's Config (<workdir>/config.json) and the model variables of its latest checkpoint
    that evaluation uses: the parameters, and the batch-norm statistics where the model has them."""
    if not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir} does not exist; train a model there first with "
                           f"`python train.py --workdir {workdir}`")
    if not os.path.lexists(os.path.join(workdir, run_outputs.CONFIG_FILE)):  # what is there, read_config judges
        raise WorkdirError(f"{workdir} holds no trained model; train one first with `python train.py --workdir {workdir}`")
    config = run_outputs.read_config(workdir)
    with Checkpoints(workdir, config, read_only=True) as checkpoints:
        snapshot = checkpoints.restore_latest(steps.create_train_state(config))
        if snapshot is None:
            raise WorkdirError(f"{checkpoints.directory} holds no finished checkpoint; train first")
    return config, snapshot.state.variables()


def forward(config: Config) -> Callable[[Variables, jax.Array], jax.Array]:
    """The evaluation forward pass, `logits(variables, images)`: uint8 images [B, 28, 28, 1] in,
    float32 logits [B, 10] out, resized and computed in `config.dtype` as evaluation does."""
    model = steps.create_model(config)

    def logits(variables: Variables, images: jax.Array) -> jax.Array:
        images = steps.preprocess(images, config.resize, jnp.dtype(config.dtype))
        return model.apply(variables, images).astype(jnp.float32)

    return logits


def predict_logits(config: Config, variables: Variables, split: input_pipeline.Split, batch_size: int) -> np.ndarray:
    """The logits of every example of `split`, in order (eval batches: padding is dropped)."""
    logits = jax.jit(forward(config))
    outputs, masks = [], []
    for batch in input_pipeline.eval_batches(split, batch_size):
        outputs.append(logits(variables, batch["image"]))
        masks.append(batch["mask"].astype(bool))
    return np.concatenate(jax.device_get(outputs))[np.concatenate(masks)]


def predict_classes(config: Config, variables: Variables, split: input_pipeline.Split, batch_size: int) -> np.ndarray:
    """The predicted class of every example of `split`, in order."""
    return np.argmax(predict_logits(config, variables, split, batch_size), -1)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """[true class, predicted class] -> number of examples."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def format_report(matrix: np.ndarray, class_names: tuple[str, ...] = input_pipeline.CLASS_NAMES) -> str:
    """Per-class accuracy, then the confusion matrix with classes numbered as in the first table."""
    total, correct = matrix.sum(), np.trace(matrix)
    lines = [f"accuracy on {total:,} test images: {correct / total:.3f}", "", "per-class accuracy:"]
    for index, (name, row) in enumerate(zip(class_names, matrix)):
        lines.append(f"  {index} {name:<11} {row[index] / max(row.sum(), 1):.3f}  ({row[index]}/{row.sum()})")
    lines += ["", "confusion matrix (rows: true class, columns: predicted class):",
              " " * 15 + "".join(f"{index:>6}" for index in range(len(class_names)))]
    for index, (name, row) in enumerate(zip(class_names, matrix)):
        lines.append(f"  {index} {name:<11}" + "".join(f"{count:>6}" for count in row))
    return "\n".join(lines)


def test_split(config: Config, data_dir: Optional[str], manual_dir: Optional[str]) -> input_pipeline.Split:
    """The whole test set of the run's data, read from `data_dir` or `manual_dir` where given."""
    config = dataclasses.replace(config, data_dir=data_dir or config.data_dir, manual_dir=manual_dir or config.manual_dir)
    return dataset.load_datasets(config)["test"]


def predict_workdir(workdir: str, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                    num_images: int = 18) -> np.ndarray:
    """Writes <workdir>/predictions.png for the first `num_images` test images; returns the
    confusion matrix over the whole test set."""
    config, variables = restore_variables(workdir)
    files.check_writable(os.path.join(workdir, PREDICTIONS_FILE))  # before the test set is predicted
    test = test_split(config, data_dir, manual_dir)
    predictions = predict_classes(config, variables, test, config.batch_size)
    shown = test.take(num_images)
    plots.plot_predictions(shown.images, shown.labels, predictions[:num_images], input_pipeline.CLASS_NAMES,
                           os.path.join(workdir, PREDICTIONS_FILE))
    return confusion_matrix(test.labels, predictions, input_pipeline.NUM_CLASSES)


MAX_IMAGES = 100  # the book's grid shows 18; more than this makes a picture no one can read


def run_parser(prog: str, description: str, num_images: int) -> FlagParser:
    """The flags of a command that reads a trained run and its test images: the workdir, where the
    data lies, and how many test images its picture shows."""
    parser = FlagParser(prog=prog, description=description)
    parser.required("--workdir", "the workdir of a training run (train.py --workdir)")
    parser.add_argument("--data_dir", help="tensorflow-datasets data directory; none: the one the run used")
    parser.add_argument("--manual_dir", help="folder of the four Fashion-MNIST .gz files; none: the one the run used")
    parser.add_argument("--num_images", type=int, default=num_images, help=f"test images shown, 1 to {MAX_IMAGES}")
    return parser


def parse_run_flags(parser: FlagParser, argv=None):
    """The flags of `run_parser` (and any the command added), refused in one line where they cannot work."""
    args = parser.parse_args(argv)
    parser.check_paths(vars(args), "workdir", "data_dir", "manual_dir")
    if not 1 <= args.num_images <= MAX_IMAGES:
        parser.error(f"--num_images must be from 1 to {MAX_IMAGES}, got {args.num_images}")
    return args


def in_one_line(parser: FlagParser, work: Callable[[], Any]) -> Any:
    """`work()`, whose refusals (no trained run, no data, a file that cannot be written) and stop
    signals end the command with one line."""
    errors.quiet_library_logs()
    with commands.stops_in_one_line(parser.prog):
        try:
            return work()
        except (WorkdirError, errors.DataError, errors.OutputError) as error:
            parser.exit(1, f"{parser.prog}: error: {error}\n")


def main(argv=None) -> int:
    parser = run_parser("python -m nin_jax.predict", __doc__.split("\n\n")[0], num_images=18)
    args = parse_run_flags(parser, argv)
    matrix = in_one_line(parser, lambda: predict_workdir(args.workdir, args.data_dir, args.manual_dir, args.num_images))
    print(format_report(matrix))
    print(f"\nwrote {os.path.join(args.workdir, PREDICTIONS_FILE)}")
    return 0
