"""What each epoch leaves in the workdir for people to look at: curves.png and TensorBoard events.

`tensorboard --logdir <workdir>` shows the run; the scalars' step is the epoch, as on curves.png.
"""

import math
import os
import threading
import time
from typing import Any, Optional

from nin_jax import background, input_pipeline, plots
from nin_jax.config import Config

CURVES_FILE = "curves.png"
REDRAW_EVERY_SECONDS = 10.0
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
    """Call `write(records)` after every epoch and `close()` after the last, which waits for the
    files; without a workdir both do nothing. Without TensorFlow, the TensorBoard events are left out.

    The files are written on a thread of their own, so the next epoch starts at once. Every
    epoch's scalars reach TensorBoard; curves.png, which takes far longer to draw, is redrawn at
    most every `REDRAW_EVERY_SECONDS` during the run and always at its end.
    """

    def __init__(self, workdir: Optional[str], config: Config):
        self._workdir = workdir
        self._config = config
        self._writer = _tensorboard_writer(workdir) if workdir else None
        self._jobs = background.InOrder("epoch_outputs")
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._written = self._drawn = 0  # epochs sent to TensorBoard, epochs on curves.png
        self._last_drawn = -math.inf  # time.monotonic() of the last redraw

    def write(self, records: list[dict[str, Any]]) -> None:
        """Starts writing the epochs that the files lack; `records` holds every epoch so far."""
        if not self._workdir:
            return
        with self._lock:
            self._records = list(records)
        if self._jobs.idle:  # else the job under way catches up, or the next one does
            self._jobs.submit(self._catch_up, False)

    def _catch_up(self, final: bool) -> None:
        with self._lock:
            records = self._records
        if self._writer and self._written < len(records):
            for record in records[self._written:]:
                for tag, key in SCALARS.items():
                    self._writer.scalar(tag, record[key], record["epoch"])
            self._writer.flush()
            self._written = len(records)
        due = final or time.monotonic() - self._last_drawn >= REDRAW_EVERY_SECONDS
        if due and self._drawn < len(records):
            self._last_drawn = time.monotonic()
            plots.plot_curves(records, self._config.num_epochs, os.path.join(self._workdir, CURVES_FILE))
            self._drawn = len(records)

    def close(self) -> None:
        try:
            if self._workdir:
                self._jobs.submit(self._catch_up, True)
            self._jobs.close()
        finally:
            if self._writer:
                self._writer.close()
