"""What each epoch leaves in the workdir for people to look at: curves.png and TensorBoard events.

`tensorboard --logdir <workdir>` shows the run; the scalars' step is the epoch, as on curves.png.
"""

import os
from typing import Any, Optional

from nin_jax import input_pipeline, plots
from nin_jax.config import Config

CURVES_FILE = "curves.png"
# TensorBoard tag -> epoch record key.
SCALARS = {
    "train/loss": "train_loss",
    "train/accuracy": "train_accuracy",
    "train/images_per_sec": "examples_per_sec",
    "test/loss": "test_loss",
    "test/accuracy": "test_accuracy",
    "train/learning_rate": "learning_rate",
}


def _tensorboard_writer(workdir: str):
    """flax's TensorBoard writer, or None where TensorFlow, which it imports, is not installed
    (as on an accelerator machine that reads `--data_arrays`)."""
    try:
        input_pipeline.import_tensorflow()
    except ImportError:
        return None
    from flax.metrics import tensorboard

    return tensorboard.SummaryWriter(workdir, auto_flush=False)


class EpochOutputs:
    """Call `write(records)` after every epoch and `close()` after the last; without a workdir
    both do nothing. Without TensorFlow, the TensorBoard events are left out."""

    def __init__(self, workdir: Optional[str], config: Config):
        self._workdir = workdir
        self._config = config
        self._writer = _tensorboard_writer(workdir) if workdir else None

    def write(self, records: list[dict[str, Any]]) -> None:
        """Redraws curves.png from all epochs so far and adds the last epoch's scalars."""
        if not self._workdir:
            return
        plots.plot_curves(records, self._config.num_epochs, os.path.join(self._workdir, CURVES_FILE))
        if not self._writer:
            return
        record = records[-1]
        for tag, key in SCALARS.items():
            self._writer.scalar(tag, record[key], record["epoch"])
        self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()
