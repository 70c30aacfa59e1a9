"""Stopping at the first non-finite training loss without a device round trip per step."""

from nin_jax import steps


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; its message names the step."""


def check_losses(carry: steps.Metrics, steps_per_epoch: int, learning_rate: float) -> None:
    """Raises Diverged if the host values of the loop's carry recorded a non-finite loss.

    The train step itself records the first step whose loss was not finite
    (`steps.summing_train_step`), so the loop looks only where it waits for the devices anyway:
    before a checkpoint is saved and at the end of an epoch. A bad state is thus never saved or
    evaluated, and the message still names the first bad step.
    """
    step = int(carry["bad_step"])
    if step:
        epoch, batch = divmod(step - 1, steps_per_epoch)
        raise Diverged(
            f"the training loss is {float(carry['bad_loss'])} at step {step} (epoch {epoch + 1}, batch {batch + 1}): "
            f"the learning rate {learning_rate:g} is likely too high; start again with a smaller "
            f"--learning_rate in a new --workdir. Nothing from step {step} on was saved."
        )
