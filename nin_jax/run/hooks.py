"""The training loop's one hook point: what a run does after each train step besides the step.

`StepHooks.after_step(step, state, carry)` calls the run's add-ons in order, each with the number
of steps done, the new state and the loop's carry (both still on the devices):

  * `Checkpoints.check`: a checkpoint that failed to save in the background ends the run here;
  * the profile trace of `--profile_steps`, which starts after the first step;
  * the progress bar and the `--log_every_steps` lines;
  * on a CPU at 224 px, the estimate of the run's length from its first steps;
  * `SaveOrStop`: within an epoch, the checkpoint every `--checkpoint_every_steps` steps, and the
    stop that a signal asked for, after saving (an epoch's end saves after its evaluation).
"""

from typing import Any, Callable, Optional, Sequence

from nin_jax.run.stopping import StopWatch

AddOn = Callable[[int, Any, Any], None]  # (steps done, state, carry)


class StepHooks:
    """Calls each add-on after every step, in order; None stands for an add-on the run has not."""

    def __init__(self, add_ons: Sequence[Optional[AddOn]]):
        self._add_ons = [add_on for add_on in add_ons if add_on is not None]

    def after_step(self, step: int, state: Any, carry: Any) -> None:
        for add_on in self._add_ons:
            add_on(step, state, carry)


class SaveOrStop:
    """Saves a checkpoint within an epoch when `--checkpoint_every_steps` says so or the processes
    agreed to stop (`StopWatch.agreed`), and then stops: `save(state, carry)` saves, with the host
    values of a carry whose losses are finite."""

    def __init__(self, watch: StopWatch, save: Callable[[Any, Any], None], every: int, steps_per_epoch: int):
        self._watch, self._save = watch, save
        self._every, self._steps_per_epoch = every, steps_per_epoch

    def __call__(self, step: int, state: Any, carry: Any) -> None:
        stopping_now = self._watch.agreed(carry, step)
        due = self._every and step % self._every == 0
        if step % self._steps_per_epoch and (due or stopping_now):  # an epoch's end is saved after its evaluation
            self._save(state, carry)
            if stopping_now:
                raise self._watch.interrupted(step)
