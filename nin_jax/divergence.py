"""Stopping at the first non-finite training loss without a device round trip per step."""

import jax
import numpy as np


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; its message names the step."""


class LossWatch:
    """Keeps every step's loss on the device and looks at them only where the loop waits for the
    device anyway: before a checkpoint is saved and at the end of an epoch. A bad state is thus
    never saved or evaluated, and the message still names the first bad step."""

    def __init__(self, last_checked_step: int, steps_per_epoch: int, learning_rate: float):
        self._last_checked_step = last_checked_step
        self._steps_per_epoch = steps_per_epoch
        self._learning_rate = learning_rate
        self._losses: list[jax.Array] = []

    def add(self, loss_sum: jax.Array) -> None:
        self._losses.append(loss_sum)

    def check(self) -> None:
        """Raises Diverged if a loss added since the last check is not finite."""
        losses = np.asarray(jax.device_get(self._losses))
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            step = self._last_checked_step + int(bad[0]) + 1
            epoch, batch = divmod(step - 1, self._steps_per_epoch)
            raise Diverged(
                f"the training loss is {losses[bad[0]]} at step {step} (epoch {epoch + 1}, batch {batch + 1}): "
                f"the learning rate {self._learning_rate:g} is likely too high; start again with a smaller "
                f"--learning_rate in a new --workdir. Nothing from step {step} on was saved."
            )
        self._last_checked_step += len(losses)
        self._losses = []
