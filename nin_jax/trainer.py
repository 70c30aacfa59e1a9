"""The training loop: `train_and_evaluate(config, workdir)`, the book's `train_ch6` in JAX.

With a workdir, the loop checkpoints at the end of every epoch (and every
`--checkpoint_every_steps` steps), and the same call resumes from the latest checkpoint; the
resumed run ends exactly where an uninterrupted one would have. With several processes, each
trains on its slice of every batch and only process 0 logs and writes files.
"""

import contextlib
import time
from typing import Any, Callable, Optional

import jax

from nin_jax import cpu_estimate, distributed, input_pipeline, locks, optim, parallel, peers, run_outputs, steps
from nin_jax.checkpoints import Checkpoints, Snapshot
from nin_jax.config import Config
from nin_jax.stopping import Interrupted, StopAgreement, check_losses, stop_requests
from nin_jax.profiling import StepTrace, check_profile_steps


def evaluate(strategy, state: steps.TrainState, split: input_pipeline.Split, batch_size: int, desc: str = "test",
             process: distributed.ProcessSlice = distributed.ProcessSlice()) -> dict[str, float]:
    """Loss, accuracy and the number of examples counted, over every example of `split` once.
    The running sums stay on the devices, added up inside the eval step."""
    totals = strategy.zero_totals()
    bar = run_outputs.StepProgress(desc, len(split), batch_size, fetch=strategy.fetch)
    for batch in input_pipeline.eval_batches(split, batch_size, process):
        totals = strategy.summed_eval_step(state, totals, batch)
        bar.update(totals)
    bar.close()
    totals = strategy.fetch(totals)
    count = int(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count, "examples": count}


def _start_or_resume(config: Config, checkpoints: Optional[Checkpoints], steps_per_epoch: int) -> Snapshot:
    """The latest checkpoint's snapshot if there is one, else a fresh start from `config.seed`."""
    initial = Snapshot.start(steps.create_train_state(config, steps_per_epoch=steps_per_epoch))
    return (checkpoints.restore_latest(initial.state) if checkpoints else None) or initial


def train_and_evaluate(config: Config, workdir: Optional[str] = None,
                       log: Callable[[str], None] = print) -> tuple[steps.TrainState, list[dict[str, Any]]]:
    """Trains NiN on Fashion-MNIST as `config` says; returns the final state (on the host) and one
    metrics record per epoch. With a `workdir`, it resumes from the latest checkpoint there, and
    the records are also in metrics.jsonl there.

    Raises `Interrupted` after saving a checkpoint when SIGINT or SIGTERM asked it, or with
    several processes any one of them, to stop (all processes stop after the same step), and
    `Diverged` at a non-finite training loss, without saving the bad state.
    """
    config = config.validate()
    check_profile_steps(config.profile_steps, workdir)
    process = distributed.initialize(config)
    strategy = parallel.create_strategy(config)  # refuses a batch that does not split over the devices
    with locks.workdir_lock(workdir) if workdir else contextlib.nullcontext():  # before anything is written there
        checkpoints = Checkpoints(workdir, config) if workdir else None
        if not distributed.is_main_process():
            workdir, log = None, lambda line: None  # checkpoints are saved by every process, together
        with checkpoints or contextlib.nullcontext(), peers.peer_failures_exit():
            return _train(config, strategy, process, checkpoints, workdir, log)


def _train(config: Config, strategy, process: distributed.ProcessSlice, checkpoints: Optional[Checkpoints],
           workdir: Optional[str], log: Callable[[str], None]) -> tuple[steps.TrainState, list[dict[str, Any]]]:
    datasets = input_pipeline.load_datasets(config)
    train_split = datasets["train"].take(config.train_examples)
    test_split = datasets["test"].take(config.eval_examples)
    steps_per_epoch = input_pipeline.num_batches(len(train_split), config.batch_size)
    snapshot = _start_or_resume(config, checkpoints, steps_per_epoch)
    step = int(snapshot.state.step)
    done_epochs, start_batch = divmod(step, steps_per_epoch)
    records = run_outputs.keep_epochs(workdir, done_epochs) if workdir else []
    if done_epochs >= config.num_epochs:
        log(f"the run in {workdir} is finished: its checkpoint has all {done_epochs} epochs ({step} steps); "
            f"raise --num_epochs to train on")
        return snapshot.state, records
    if step:
        log(f"resuming from the checkpoint of step {step} in {checkpoints.directory}: "
            f"epoch {done_epochs + 1}, batch {start_batch + 1} of {steps_per_epoch} is next")
    run_outputs.write_config(workdir, config)

    outputs = run_outputs.EpochOutputs(workdir, config)
    with stop_requests() as stop, contextlib.closing(outputs), \
            StepTrace(workdir, config.profile_steps, log) as trace:  # a first Ctrl-C saves, then stops
        devices = parallel.describe_devices(strategy)
        state = strategy.put_state(snapshot.state)
        first_batch = next(input_pipeline.eval_batches(train_split, config.batch_size, process))
        compile_seconds = strategy.compile(state, first_batch)
        log(f"compiled the train and eval steps for {devices} ({strategy.name}) in {compile_seconds:.1f}s")
        if cpu_estimate.applies(config):
            log(cpu_estimate.measure_and_estimate(strategy, state, first_batch, config, len(train_split),
                                                  len(test_split)))
        learning_rate = optim.learning_rate_schedule(config, steps_per_epoch)
        agreement = StopAgreement(stop, jax.process_count())
        resume = (f"saved a checkpoint in {checkpoints.directory}; run the same command to resume"
                  if checkpoints else "nothing was saved (no --workdir)")

        def finished(carry: steps.Metrics) -> steps.Metrics:
            """The host values of `carry`, once its losses are known to be finite."""
            carry = strategy.fetch(carry)
            check_losses(carry, steps_per_epoch, config.learning_rate)
            return carry

        def save(state: steps.TrainState, carry: steps.Metrics, epoch_seconds: float) -> None:
            """Checkpoints `state` with the host values of a checked `carry`: a diverged state is never saved."""
            if checkpoints:
                totals = {name: carry[name] for name in steps.METRIC_NAMES}
                checkpoints.save(Snapshot(strategy.get_state(state), totals, epoch_seconds))

        carry = strategy.put_carry({**steps.zero_carry(), **snapshot.epoch_totals})
        epoch_seconds = snapshot.epoch_seconds
        for epoch in range(done_epochs + 1, config.num_epochs + 1):
            start = time.perf_counter() - epoch_seconds
            bar = run_outputs.StepProgress(f"epoch {epoch}/{config.num_epochs}", len(train_split), config.batch_size,
                                        log, config.log_every_steps, start_batch, fetch=strategy.fetch)
            batches = input_pipeline.train_batches(train_split, config.batch_size, config.seed, epoch, start_batch,
                                                   process)
            for batch in batches:
                state, carry = strategy.summed_train_step(state, carry, batch, agreement.vote)
                trace.after_step(state)
                done = bar.update(carry)  # a step LAG_STEPS back, finished: its votes are the same everywhere
                step += 1
                votes = None if done is None or agreement.alone else strategy.fetch(done["stop_votes"])
                stopping = agreement.agreed(votes)
                checkpoint_due = config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
                if step % steps_per_epoch and (checkpoint_due or stopping):  # an epoch's end is saved below
                    save(state, finished(carry), time.perf_counter() - start)
                    if stopping:
                        raise agreement.interrupted(step, resume)
            bar.close()
            totals = finished(carry)
            train_seconds = time.perf_counter() - start
            test = evaluate(strategy, state, test_split, config.batch_size, f"epoch {epoch}/{config.num_epochs} test",
                            process)
            record = {
                "epoch": epoch,
                "train_loss": float(totals["loss_sum"] / totals["count"]),
                "train_accuracy": float(totals["correct"] / totals["count"]),
                "test_loss": test["loss"],
                "test_accuracy": test["accuracy"],
                "train_examples": int(totals["count"]),
                "test_examples": test["examples"],
                "learning_rate": float(learning_rate(step - 1)),  # that of the epoch's last step
                "examples_per_sec": float(totals["count"]) / train_seconds,
                "train_seconds": train_seconds,
                "compile_seconds": compile_seconds,
                "devices": devices,
                "parallel": strategy.name,
            }
            records.append(record)
            log(run_outputs.epoch_line(record, config.num_epochs))
            run_outputs.append_metrics(workdir, record)
            outputs.write(records)
            carry, epoch_seconds, start_batch = strategy.zero_carry(), 0.0, 0
            save(state, steps.zero_carry(), epoch_seconds)
            if agreement.agreed(totals["stop_votes"]):
                raise agreement.interrupted(step, resume)
        if agreement.vote:  # asked after the last step: everything is saved
            raise agreement.interrupted(step, resume)
    return strategy.get_state(state), records
