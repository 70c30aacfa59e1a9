"""What each epoch leaves in the workdir for people to look at: curves.png and TensorBoard events.

`tensorboard --logdir <workdir>` shows the run; the scalars' step is the epoch, as on curves.png.
"""

import math
import os
import socket
import threading
import time
from typing import Any, Optional

from nin_jax import background
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


class ScalarEvents:
    """TensorBoard scalars in an event file of `logdir`, written with the `tensorboard` package's
    record writer. Its EventFileWriter opens files through `tensorboard.compat.tf`, which imports
    TensorFlow where it is installed (seconds); a plain file needs none. Each value is the float32
    'scalars' tensor summary that `tf.summary.scalar` would write."""

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.record_writer import RecordWriter

        # TensorBoard finds event files by this name; the pid keeps two writers apart.
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self._records = RecordWriter(open(os.path.join(logdir, name), "wb"))
        self._add(file_version="brain.Event:2")

    def write(self, values: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.scalar import summary_v2

        summary = summary_pb2.Summary(value=[summary_v2.scalar_pb(tag, value).value[0] for tag, value in values.items()])
        self._add(step=step, summary=summary)

    def _add(self, **fields) -> None:
        from tensorboard.compat.proto import event_pb2

        self._records.write(event_pb2.Event(wall_time=time.time(), **fields).SerializeToString())
        self._records.flush()

    def close(self) -> None:
        self._records.close()


def _scalar_events(workdir: str) -> Optional[ScalarEvents]:
    """The workdir's event writer, or None where the `tensorboard` package is not installed."""
    try:
        return ScalarEvents(workdir)
    except ImportError:
        return None


class EpochOutputs:
    """Call `write(records)` after every epoch and `close()` after the last, which waits for the
    files; without a workdir both do nothing. Without the `tensorboard` package, the TensorBoard
    events are left out.

    The files are written on a thread of their own, so the next epoch starts at once. Every
    epoch's scalars reach TensorBoard; curves.png, which takes far longer to draw, is redrawn at
    most every `REDRAW_EVERY_SECONDS` during the run and always at its end.
    """

    def __init__(self, workdir: Optional[str], config: Config):
        self._workdir = workdir
        self._config = config
        self._events = _scalar_events(workdir) if workdir else None
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
        if self._events and self._written < len(records):
            for record in records[self._written:]:
                self._events.write({tag: record[key] for tag, key in SCALARS.items()}, record["epoch"])
            self._written = len(records)
        due = final or time.monotonic() - self._last_drawn >= REDRAW_EVERY_SECONDS
        if due and self._drawn < len(records):
            from nin_jax import plots  # matplotlib, imported once there is something to draw

            self._last_drawn = time.monotonic()
            plots.plot_curves(records, self._config.num_epochs, os.path.join(self._workdir, CURVES_FILE))
            self._drawn = len(records)

    def close(self) -> None:
        try:
            if self._workdir:
                self._jobs.submit(self._catch_up, True)
            self._jobs.close()
        finally:
            if self._events:
                self._events.close()
