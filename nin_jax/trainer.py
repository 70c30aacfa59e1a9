"""The training loop: `train_and_evaluate(config, workdir)`, the book's `train_ch6` in JAX.

Each epoch runs the train steps over the shuffled training set, then evaluates the whole test set
and prints the book's line. What a run does besides (checks, checkpoints and resuming, stop
signals, progress bars, the profile, the files in the workdir, several processes) is the
`TrainingRun`'s, called at the few points below, and after each step through its one hook point.
"""

from typing import Any, Callable, Optional

import jax.numpy as jnp

from nin_jax import input_pipeline, steps
from nin_jax.config import Config
from nin_jax.data import dataset
from nin_jax.run import progress, stopping
from nin_jax.run.training_run import TrainingRun
from nin_jax.runtime import parallel


def train_and_evaluate(config: Config, workdir: Optional[str] = None,
                       log: Callable[[str], None] = print) -> tuple[steps.TrainState, list[dict[str, Any]]]:
    """Trains NiN on Fashion-MNIST as `config` says; returns the final state (on the host) and one
    metrics record per epoch. With a `workdir`, it resumes from the latest checkpoint there, and
    the records are also in metrics.jsonl there.

    Raises `stopping.Interrupted` after saving a checkpoint when SIGINT, SIGTERM or SIGHUP asked it
    (or, with several processes, any one of them) to stop, or at once at a second such signal, and
    `stopping.Diverged` at a non-finite training loss, without saving the bad state.
    """
    with TrainingRun(config, workdir, log) as run:
        datasets = dataset.load_datasets(config)  # this process's slice of every batch comes from them
        train_split = datasets["train"].take(config.train_examples)
        test_split = datasets["test"].take(config.eval_examples)
        steps_per_epoch = input_pipeline.num_batches(len(train_split), config.batch_size)
        snapshot = run.resume(steps.create_train_state(config, steps_per_epoch), steps_per_epoch)
        if run.finished:
            return snapshot.state, run.records

        strategy = parallel.create_strategy(config, loop_steps(config))
        state = strategy.put_state(snapshot.state)
        first_batch = next(input_pipeline.eval_batches(train_split, config.batch_size, run.process))
        with run.training(strategy, len(train_split), len(test_split)):  # from here a stop signal saves first
            run.compile(strategy, state, first_batch)  # both steps; on a CPU, says how long the run will take
            totals = strategy.put_carry(zero_carry(snapshot.epoch_totals))
            for epoch in range(run.first_epoch, config.num_epochs + 1):
                with run.epoch(epoch) as start_batch:
                    for batch in input_pipeline.train_batches(train_split, config.batch_size, config.seed, epoch,
                                                              start_batch, run.process):
                        state, totals = strategy.train_step(state, totals, batch, run.stop_vote)
                        run.after_step(state, totals)  # progress, profile, checkpoints, stop signals
                test = evaluate(strategy, state, test_split, config.batch_size,
                                f"epoch {epoch}/{config.num_epochs} test", run.process)
                totals = run.end_epoch(state, test)  # the epoch's line, files and checkpoint
        return strategy.get_state(state), run.records


def loop_steps(config: Config) -> parallel.StepsForAxis:
    """The steps as the loop runs them, for a strategy's pmap `axis_name` (None under jit): each
    adds its metric sums into running totals in the same compiled call, the book's `Accumulator`
    on the devices, so that the loop never waits for a step. The train step's carry also holds what
    the stop watch reads (run/stopping.py): every process's vote to stop, which each batch carries
    as `stop` (1 on a process's devices where it was asked to stop) and which is summed over all
    devices with the other sums, so every process reads the same votes after the same step; and
    the first step whose loss was not finite."""

    def for_axis(axis_name: Optional[str]) -> parallel.LoopSteps:
        train_step, eval_step = steps.step_functions(config, axis_name)

        def carried_train_step(state: steps.TrainState, carry: dict[str, Any],
                               batch: dict[str, Any]) -> tuple[steps.TrainState, dict[str, Any]]:
            batch = dict(batch)
            votes = steps.sum_over_devices(jnp.sum(batch.pop("stop")), axis_name)
            new_state, metrics = train_step(state, batch)
            return new_state, {"metrics": steps.add_metrics(carry["metrics"], metrics),
                               "watch": stopping.watch_step(carry["watch"], votes, state.step, metrics["loss_sum"])}

        def totalled_eval_step(state: steps.TrainState, totals: steps.Metrics, batch: dict[str, Any]) -> steps.Metrics:
            return steps.add_metrics(totals, eval_step(state, batch))

        return parallel.LoopSteps(carried_train_step, totalled_eval_step, zero_carry(), steps.zero_metrics())

    return for_axis


def zero_carry(metrics: Optional[steps.Metrics] = None) -> dict[str, Any]:
    """Where the train step's carry starts: the epoch's metric sums so far (`metrics`, default
    zero) and an empty stop watch."""
    return {"metrics": steps.zero_metrics() if metrics is None else metrics, "watch": stopping.zero_watch()}


def evaluate(strategy, state: steps.TrainState, split: input_pipeline.Split, batch_size: int, desc: str = "test",
             process: input_pipeline.ProcessSlice = input_pipeline.ProcessSlice()) -> dict[str, float]:
    """Loss, accuracy and the number of examples counted, over every example of `split` once (the
    book's `evaluate_accuracy_gpu`). The running sums stay on the devices, added up inside the step."""
    totals = strategy.zero_totals()
    with progress.StepProgress(desc, len(split), batch_size, fetch=strategy.fetch) as bar:
        for batch in input_pipeline.eval_batches(split, batch_size, process):
            totals = strategy.eval_step(state, totals, batch)
            bar.update(totals)
    totals = strategy.fetch(totals)
    count = int(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count, "examples": count}
