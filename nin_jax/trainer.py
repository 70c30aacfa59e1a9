"""The training loop: `train_and_evaluate(config, workdir)`, the book's `train_ch6` in JAX.

With a workdir, the loop checkpoints at the end of every epoch (and every
`--checkpoint_every_steps` steps), and the same call resumes from the latest checkpoint; the
resumed run ends exactly where an uninterrupted one would have. With several processes, each
trains on its slice of every batch and only process 0 logs and writes files.
"""

import contextlib
import time
from typing import Any, Callable, Iterator, Optional

import jax

from nin_jax import (cpu_estimate, dataset, distributed, input_pipeline, kernels, locks, parallel, peers, run_outputs,
                     steps)
from nin_jax.checkpoints import Checkpoints, Snapshot
from nin_jax.config import Config
from nin_jax.errors import OutOfMemory
from nin_jax.stopping import StopWatch, StoppedAtOnce, stopped_at_once
from nin_jax.profiling import StepTrace, check_profile_steps


def evaluate(strategy, state: steps.TrainState, split: input_pipeline.Split, batch_size: int, desc: str = "test",
             process: distributed.ProcessSlice = distributed.ProcessSlice()) -> dict[str, float]:
    """Loss, accuracy and the number of examples counted, over every example of `split` once.
    The running sums stay on the devices, added up inside the eval step."""
    totals = strategy.zero_totals()
    with run_outputs.StepProgress(desc, len(split), batch_size, fetch=strategy.fetch) as bar:
        for batch in input_pipeline.eval_batches(split, batch_size, process):
            totals = strategy.eval_step(state, totals, batch)
            bar.update(totals)
    totals = strategy.fetch(totals)
    count = int(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count, "examples": count}


def train_and_evaluate(config: Config, workdir: Optional[str] = None,
                       log: Callable[[str], None] = print) -> tuple[steps.TrainState, list[dict[str, Any]]]:
    """Trains NiN on Fashion-MNIST as `config` says; returns the final state (on the host) and one
    metrics record per epoch. With a `workdir`, it resumes from the latest checkpoint there, and
    the records are also in metrics.jsonl there.

    Raises `stopping.Interrupted` after saving a checkpoint when SIGINT or SIGTERM asked it, or
    with several processes any one of them, to stop (all processes stop after the same step), or
    at once, saying which checkpoint is kept, at a second such signal, and
    `stopping.Diverged` at a non-finite training loss, without saving the bad state.
    """
    config = config.validate()
    check_profile_steps(config.profile_steps, workdir)
    kernels.check_deterministic(config)
    process = distributed.initialize(config)
    strategy = parallel.create_strategy(config)  # refuses a batch that does not split over the devices
    with locks.workdir_lock(workdir) if workdir else contextlib.nullcontext():  # before anything is written there
        checkpoints = Checkpoints(workdir, config) if workdir else None
        if workdir:
            run_outputs.check_outputs(workdir, config.profile_steps)
        if not distributed.is_main_process():
            workdir, log = None, lambda line: None  # checkpoints are saved by every process, together
        try:
            with checkpoints or contextlib.nullcontext(), peers.peer_failures_exit(), \
                    out_of_memory_explained(config, strategy.num_devices, workdir):
                return _train(config, strategy, process, checkpoints, workdir, log)
        except StoppedAtOnce as stop:  # the checkpoints are closed: every save begun is whole or gone
            raise stopped_at_once(stop.signum, checkpoints.kept if checkpoints else None) from None


# How XLA says it: RESOURCE_EXHAUSTED, or (jaxlib 0.7 on the CPU) an INTERNAL error that says so.
OUT_OF_MEMORY_WORDS = ("RESOURCE_EXHAUSTED", "Out of memory")


@contextlib.contextmanager
def out_of_memory_explained(config: Config, num_devices: int, workdir: Optional[str]) -> Iterator[None]:
    """Turns a host `MemoryError`, or XLA's RESOURCE_EXHAUSTED while a step compiles or runs, into
    `OutOfMemory`, whose one line names the flags that set the memory and a batch size to try."""
    try:
        yield
    except (MemoryError, jax.errors.JaxRuntimeError) as error:
        if not isinstance(error, MemoryError) and not any(word in str(error) for word in OUT_OF_MEMORY_WORDS):
            raise
        platform = jax.local_devices()[0].platform
        where = "the host" if isinstance(error, MemoryError) else f"the {platform} device"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        smaller = config.batch_size // 2 // num_devices * num_devices
        advice = (f"use a smaller --batch_size, such as {smaller}" if smaller else "use a smaller --resize")
        if platform != "cpu":  # a GPU or TPU, which the plan command compiles for
            advice += "; python -m nin_jax.plan --target local with the same flags finds the largest batch that fits"
        if workdir:
            advice += f"; a checkpoint resumes only at its own --batch_size, so use a new --workdir if {workdir} holds one"
        raise OutOfMemory(f"out of memory on {where} at --batch_size {config.batch_size}, --resize {config.resize}, "
                          f"--dtype {config.dtype} ({reason}): {advice}") from None


def _train(config: Config, strategy, process: distributed.ProcessSlice, checkpoints: Optional[Checkpoints],
           workdir: Optional[str], log: Callable[[str], None]) -> tuple[steps.TrainState, list[dict[str, Any]]]:
    # Input: this process's slice of every batch of the two splits.
    datasets = dataset.load_datasets(config)
    train_split = datasets["train"].take(config.train_examples)
    test_split = datasets["test"].take(config.eval_examples)
    steps_per_epoch = input_pipeline.num_batches(len(train_split), config.batch_size)

    # Where the run stands: a fresh start, or the latest checkpoint in the workdir.
    initial = Snapshot.start(steps.create_train_state(config, steps_per_epoch=steps_per_epoch))
    snapshot = (checkpoints.restore_latest(initial.state) if checkpoints else None) or initial
    step = int(snapshot.state.step)
    done_epochs, start_batch = divmod(step, steps_per_epoch)
    records = run_outputs.keep_epochs(workdir, done_epochs, log) if workdir else []
    if done_epochs >= config.num_epochs:
        how_to_go_on = ("raise --num_epochs to train on" if config.lr_schedule == "constant" else
                        f"its --lr_schedule {config.lr_schedule} spans exactly these epochs, so it cannot go on: "
                        f"train a longer run in a new --workdir")
        log(f"the run in {workdir} is finished: its checkpoint has "
            f"{f'all {done_epochs} epochs' if done_epochs > 1 else '1 epoch'} ({step} steps); "
            f"{how_to_go_on}")
        return snapshot.state, records
    if step:
        log(f"resuming from the checkpoint of step {step} in {checkpoints.directory}: "
            f"epoch {done_epochs + 1}, batch {start_batch + 1} of {steps_per_epoch} is next")
    run_outputs.write_config(workdir, config)

    # From here on a first Ctrl-C or SIGTERM saves, then stops (`nin_jax.stopping`).
    resume = (f"saved a checkpoint in {checkpoints.directory}; run the same command to resume"
              if checkpoints else "nothing was saved (no --workdir)")
    watch = StopWatch(jax.process_count(), steps_per_epoch, config.learning_rate, resume,
                      kept=checkpoints.kept if checkpoints else None, first_step=step,
                      last_step=config.num_epochs * steps_per_epoch, fetch=strategy.fetch)
    outputs = run_outputs.EpochOutputs(workdir, config)
    with watch, contextlib.closing(outputs), StepTrace(workdir, config.profile_steps, log,
                                                                    strategy.train_program) as trace:
        # The steps, compiled for this state and batch layout before the first epoch.
        devices = parallel.describe_devices(strategy)
        state = strategy.put_state(snapshot.state)
        first_batch = next(input_pipeline.eval_batches(train_split, config.batch_size, process))
        compile_seconds = strategy.compile(state, first_batch)
        log(f"compiled the train and eval steps for {devices} ({strategy.name}) in {compile_seconds:.1f}s")

        # The loop: an epoch of train steps, its evaluation, its record and checkpoint.
        learning_rate = steps.learning_rate_schedule(config, steps_per_epoch)

        def save(state: steps.TrainState, host_carry: dict[str, Any], epoch_seconds: float) -> None:
            """Checkpoints `state` with a carry that `watch.check_finite` passed: never a diverged state."""
            if checkpoints:
                checkpoints.save(Snapshot(strategy.get_state(state), host_carry["metrics"], epoch_seconds))

        def checked(carry: dict[str, Any]) -> dict[str, Any]:
            """The host values of `carry`, once its losses are known to be finite."""
            carry = strategy.fetch(carry)
            watch.check_finite(carry)
            return carry

        carry = strategy.put_carry(steps.zero_carry(snapshot.epoch_totals))
        epoch_seconds = snapshot.epoch_seconds
        estimate = (cpu_estimate.Estimate(strategy, first_batch, config, len(train_split), len(test_split), log)
                    if cpu_estimate.applies(config) else None)  # says from the first step how long the run takes
        for epoch in range(done_epochs + 1, config.num_epochs + 1):
            start = time.perf_counter() - epoch_seconds
            with run_outputs.StepProgress(f"epoch {epoch}/{config.num_epochs}", len(train_split), config.batch_size,
                                          log, config.log_every_steps, start_batch, fetch=strategy.fetch) as bar:
                for batch in input_pipeline.train_batches(train_split, config.batch_size, config.seed, epoch,
                                                          start_batch, process):
                    state, carry = strategy.train_step(state, carry, batch, watch.vote)
                    if checkpoints:
                        checkpoints.check()  # a save that failed in the background ends the run here
                    trace.after_step(state)
                    bar.update(carry["metrics"])
                    if estimate:
                        estimate.after_step(state, carry)
                    step += 1
                    stopping_now = watch.agreed(carry, step)
                    checkpoint_due = config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
                    if step % steps_per_epoch and (checkpoint_due or stopping_now):  # an epoch's end is saved below
                        save(state, checked(carry), time.perf_counter() - start)
                        if stopping_now:
                            raise watch.interrupted(step)
            carry = checked(carry)
            train_seconds = time.perf_counter() - start
            test = evaluate(strategy, state, test_split, config.batch_size, f"epoch {epoch}/{config.num_epochs} test",
                            process)
            records.append(_epoch_record(epoch, carry["metrics"], train_seconds, test, float(learning_rate(step - 1)),
                                         compile_seconds, devices, strategy.name))
            log(run_outputs.epoch_line(records[-1], config.num_epochs))
            run_outputs.append_metrics(workdir, records[-1])
            outputs.write(records)
            save(state, steps.zero_carry(), 0.0)
            if watch.agreed_after_epoch(carry, step):
                raise watch.interrupted(step)
            carry, epoch_seconds, start_batch = strategy.zero_carry(), 0.0, 0
        if watch.vote:  # asked after the last step: everything is saved
            raise watch.interrupted(step)
    return strategy.get_state(state), records


def _epoch_record(epoch: int, train: steps.Metrics, train_seconds: float, test: dict[str, float],
                  learning_rate: float, compile_seconds: float, devices: str, parallel_name: str) -> dict[str, Any]:
    """One line of metrics.jsonl; `learning_rate` is that of the epoch's last step."""
    return {
        "epoch": epoch,
        "train_loss": float(train["loss_sum"] / train["count"]),
        "train_accuracy": float(train["correct"] / train["count"]),
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "train_examples": int(train["count"]),
        "test_examples": test["examples"],
        "learning_rate": learning_rate,
        "examples_per_sec": float(train["count"]) / train_seconds,
        "train_seconds": train_seconds,
        "compile_seconds": compile_seconds,
        "devices": devices,
        "parallel": parallel_name,
    }
