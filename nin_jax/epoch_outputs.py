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
}


class EpochOutputs:
    """Call `write(records)` after every epoch and `close()` after the last; without a workdir
    both do nothing."""

    def __init__(self, workdir: Optional[str], config: Config):
        self._workdir = workdir
        self._config = config
        self._writer = None
        if workdir:
            input_pipeline.import_tensorflow()  # flax's writer imports TensorFlow
            from flax.metrics import tensorboard

            self._writer = tensorboard.SummaryWriter(workdir, auto_flush=False)

    def write(self, records: list[dict[str, Any]]) -> None:
        """Redraws curves.png from all epochs so far and adds the last epoch's scalars."""
        if not self._writer:
            return
        plots.plot_curves(records, self._config.num_epochs, os.path.join(self._workdir, CURVES_FILE))
        record = records[-1]
        for tag, key in SCALARS.items():
            self._writer.scalar(tag, record[key], record["epoch"])
        self._writer.scalar("learning_rate", self._config.learning_rate, record["epoch"])
        self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()
