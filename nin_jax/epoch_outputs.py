"""What each epoch leaves in the workdir for people to look at: curves.png and TensorBoard events.

`tensorboard --logdir <workdir>` shows the run; the scalars' step is the epoch, as on curves.png.
"""

import os
import time
from typing import Any, Optional

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


class ScalarEvents:
    """TensorBoard scalars in an event file of `logdir`, written with the `tensorboard` package's
    own writer, as torch.utils.tensorboard does: TensorFlow is neither needed nor imported. Each
    value is the float32 'scalars' tensor summary that `tf.summary.scalar` would write."""

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._file = EventFileWriter(logdir)

    def write(self, values: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.scalar import summary_v2

        summary = summary_pb2.Summary(value=[summary_v2.scalar_pb(tag, value).value[0] for tag, value in values.items()])
        self._file.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _scalar_events(workdir: str) -> Optional[ScalarEvents]:
    """The workdir's event writer, or None where the `tensorboard` package is not installed."""
    try:
        return ScalarEvents(workdir)
    except ImportError:
        return None


class EpochOutputs:
    """Call `write(records)` after every epoch and `close()` after the last; without a workdir
    both do nothing. Without the `tensorboard` package, the TensorBoard events are left out."""

    def __init__(self, workdir: Optional[str], config: Config):
        self._workdir = workdir
        self._config = config
        self._events = _scalar_events(workdir) if workdir else None

    def write(self, records: list[dict[str, Any]]) -> None:
        """Redraws curves.png from all epochs so far and adds the last epoch's scalars."""
        if not self._workdir:
            return
        from nin_jax import plots  # matplotlib, imported once there is something to draw

        plots.plot_curves(records, self._config.num_epochs, os.path.join(self._workdir, CURVES_FILE))
        if self._events:
            record = records[-1]
            self._events.write({tag: record[key] for tag, key in SCALARS.items()}, record["epoch"])

    def close(self) -> None:
        if self._events:
            self._events.close()
