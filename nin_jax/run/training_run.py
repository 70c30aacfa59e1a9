"""Everything a training run does besides computing, behind the few calls the loop makes in order
(`nin_jax.trainer`):

    with TrainingRun(config, workdir, log) as run:   # checks, processes, the workdir's lock, checkpoints
        snapshot = run.resume(initial_state, steps_per_epoch)   # or run.finished
        with run.training(strategy, num_train, num_test):   # stop signals, outputs, profile
            run.compile(strategy, state, first_batch)       # on a CPU, says how long the run will take
            for epoch in ...:
                with run.epoch(epoch) as start_batch:    # the progress bar and the epoch's clock
                    for batch in ...: ...; run.after_step(state, carry)   # the one hook point (hooks.py)
                carry = run.end_epoch(state, test)       # the record, its line and files, the checkpoint

With a workdir, the run checkpoints at the end of every epoch (and every `--checkpoint_every_steps`
steps), and the same call resumes from the latest checkpoint, ending exactly where an uninterrupted
run would have. With several processes, each trains on its slice of every batch and only process 0
logs and writes files.
"""

import contextlib
import time
from typing import Any, Callable, Iterator, Optional

import jax

from nin_jax import input_pipeline, steps
from nin_jax.config import Config
from nin_jax.run import cpu_estimate, hooks, outputs, progress
from nin_jax.run.checkpoints import Checkpoints, Snapshot
from nin_jax.run.profiling import StepTrace
from nin_jax.run.stopping import StopWatch, StoppedAtOnce, stopped_at_once
from nin_jax.runtime import distributed, locks, parallel, peers
from nin_jax.runtime.errors import OutOfMemory


class TrainingRun:
    """One run of `train_and_evaluate`. Raises `stopping.Interrupted` after saving a checkpoint
    when a signal asked this process (or, with several processes, any one of them) to stop, or at
    once, saying which checkpoint is kept, at a second such signal; `stopping.Diverged` at a
    non-finite training loss, without saving the bad state."""

    def __init__(self, config: Config, workdir: Optional[str], log: Callable[[str], None]):
        self.config, self.workdir, self.log = config, workdir, log
        self.checkpoints: Optional[Checkpoints] = None
        self.records: list[dict[str, Any]] = []
        self.step = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "TrainingRun":
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _start(self) -> None:
        config = self.config.preflight(self.workdir)
        self.process = distributed.initialize(config)
        self.num_devices = parallel.num_devices(config)  # refuses a batch that does not split over them
        if self.workdir:
            self._stack.enter_context(locks.workdir_lock(self.workdir))  # before anything is written there
            self.checkpoints = self._stack.enter_context(Checkpoints(self.workdir, config))
            outputs.check_outputs(self.workdir, config.profile_steps)
        if not distributed.is_main_process():
            self.workdir, self.log = None, lambda line: None  # checkpoints are saved by every process, together
        self._stack.enter_context(peers.peer_failures_exit())
        self._stack.enter_context(out_of_memory_explained(config, self.num_devices, self.workdir))

    def __exit__(self, kind, error, traceback) -> None:
        self._stack.__exit__(kind, error, traceback)
        if isinstance(error, StoppedAtOnce):  # the checkpoints are closed: every save begun is whole or gone
            raise stopped_at_once(error.signum, self.checkpoints.kept if self.checkpoints else None) from None

    def resume(self, initial_state: steps.TrainState, steps_per_epoch: int) -> Snapshot:
        """Where the run stands: the latest checkpoint in the workdir, or `initial_state`. Keeps
        metrics.jsonl's records of the epochs done and says where the run goes on, or that it has
        finished (`finished`)."""
        self.steps_per_epoch = steps_per_epoch
        initial = Snapshot.start(initial_state)
        snapshot = (self.checkpoints.restore_latest(initial.state) if self.checkpoints else None) or initial
        self.step = int(snapshot.state.step)
        done_epochs, self.start_batch = divmod(self.step, steps_per_epoch)
        self.first_epoch, self._epoch_seconds = done_epochs + 1, snapshot.epoch_seconds
        self.records = outputs.keep_epochs(self.workdir, done_epochs, self.log) if self.workdir else []
        self.finished = done_epochs >= self.config.num_epochs
        if self.finished:
            self.log(self._finished_line(done_epochs))
            return snapshot
        if self.step:
            self.log(f"resuming from the checkpoint of step {self.step} in {self.checkpoints.directory}: "
                     f"epoch {self.first_epoch}, batch {self.start_batch + 1} of {steps_per_epoch} is next")
        outputs.write_config(self.workdir, self.config)
        return snapshot

    def _finished_line(self, done_epochs: int) -> str:
        how_to_go_on = ("raise --num_epochs to train on" if self.config.lr_schedule == "constant" else
                        f"its --lr_schedule {self.config.lr_schedule} spans exactly these epochs, so it cannot go on: "
                        f"train a longer run in a new --workdir")
        return (f"the run in {self.workdir} is finished: its checkpoint has "
                f"{f'all {done_epochs} epochs' if done_epochs > 1 else '1 epoch'} ({self.step} steps); {how_to_go_on}")

    def compile(self, strategy, state: steps.TrainState, first_batch: input_pipeline.Batch) -> None:
        """Compiles both steps before the first epoch; on a CPU, says first how long the run will take."""

        examples = (self.num_train_examples, self._num_test_examples)
        said = []

        def before_compiling(lowered) -> None:
            said.append(cpu_estimate.applies() and cpu_estimate.say_before_compiling(lowered, self.config, examples,
                                                                                     self.workdir, self.log))

        seconds = strategy.compile(state, first_batch, before_compiling)
        if any(said):  # a long run: its first steps will tell how long
            self._estimate = cpu_estimate.Estimate(strategy, first_batch, self.config, *examples, self.log)
        self.devices, self.compile_seconds = parallel.describe_devices(strategy), seconds
        self.log(f"compiled the train and eval steps for {self.devices} ({strategy.name}) in {seconds:.1f}s")

    @contextlib.contextmanager
    def training(self, strategy, num_train_examples: int, num_test_examples: int) -> Iterator["TrainingRun"]:
        """The epochs' context: from here on a first Ctrl-C or SIGTERM saves, then stops (`stopping`)."""
        config, self._strategy = self.config, strategy
        self.num_train_examples, self._num_test_examples, self._estimate = num_train_examples, num_test_examples, None
        resume = (f"saved a checkpoint in {self.checkpoints.directory}; run the same command to resume"
                  if self.checkpoints else "nothing was saved (no --workdir)")
        self.watch = StopWatch(jax.process_count(), self.steps_per_epoch, config.learning_rate, resume,
                               kept=self.checkpoints.kept if self.checkpoints else None, first_step=self.step,
                               last_step=config.num_epochs * self.steps_per_epoch, fetch=strategy.fetch)
        self._outputs = outputs.EpochOutputs(self.workdir, config)
        trace = StepTrace(self.workdir, config.profile_steps, self.log, strategy.train_program)
        self._hooks = hooks.StepHooks([
            lambda step, state, carry: self.checkpoints and self.checkpoints.check(),
            lambda step, state, carry: trace.after_step(state),
            lambda step, state, carry: self._bar.update(carry["metrics"]),
            lambda step, state, carry: self._estimate and self._estimate.after_step(state, carry),
            hooks.SaveOrStop(self.watch, lambda state, carry: self._save(state, self._checked(carry)["metrics"],
                                                                          self._seconds()),
                             config.checkpoint_every_steps, self.steps_per_epoch),
        ])
        with self.watch, contextlib.closing(self._outputs), trace:
            yield self
            if self.watch.vote:  # asked after the last step: everything is saved
                raise self.watch.interrupted(self.step)

    @property
    def stop_vote(self) -> bool:
        """This process's vote to stop, which every train step carries (`trainer.loop_steps`)."""
        return self.watch.vote

    @contextlib.contextmanager
    def epoch(self, epoch: int) -> Iterator[int]:
        """An epoch's train steps, from the batch it starts at (given): its progress bar and clock."""
        self._epoch, self._epoch_start = epoch, time.perf_counter() - self._epoch_seconds
        with progress.StepProgress(f"epoch {epoch}/{self.config.num_epochs}", self.num_train_examples,
                                   self.config.batch_size, self.log, self.config.log_every_steps, self.start_batch,
                                   fetch=self._strategy.fetch) as self._bar:
            yield self.start_batch
        self._epoch_carry = self._checked(self._carry)  # waits for the epoch's last step
        self._train_seconds = self._seconds()

    def after_step(self, state: steps.TrainState, step_carry: dict[str, Any]) -> None:
        """The loop's one hook point, after each train step is dispatched (hooks.py)."""
        self.step += 1
        self._carry = step_carry
        self._hooks.after_step(self.step, state, step_carry)

    def end_epoch(self, state: steps.TrainState, test: dict[str, float]) -> dict[str, Any]:
        """The epoch's record, its line, metrics.jsonl, curves and events, and its checkpoint; then
        the stop that a signal asked for. Returns the zero carry that the next epoch starts from."""
        learning_rate = float(steps.learning_rate_schedule(self.config, self.steps_per_epoch)(self.step - 1))
        self.records.append(outputs.epoch_record(self._epoch, self._epoch_carry["metrics"], self._train_seconds, test,
                                                 learning_rate, self.compile_seconds, self.devices,
                                                 self._strategy.name))
        self.log(outputs.epoch_line(self.records[-1], self.config.num_epochs))
        outputs.append_metrics(self.workdir, self.records[-1])
        self._outputs.write(self.records)
        self._save(state, steps.zero_metrics(), 0.0)
        if self.watch.agreed_after_epoch(self._epoch_carry, self.step):
            raise self.watch.interrupted(self.step)
        self._epoch_seconds, self.start_batch = 0.0, 0
        return self._strategy.zero_carry()

    def _seconds(self) -> float:
        return time.perf_counter() - self._epoch_start

    def _checked(self, step_carry: dict[str, Any]) -> dict[str, Any]:
        """The host values of a carry, once its losses are known to be finite."""
        host_carry = self._strategy.fetch(step_carry)
        self.watch.check_finite(host_carry)
        return host_carry

    def _save(self, state: steps.TrainState, epoch_totals: steps.Metrics, epoch_seconds: float) -> None:
        """Checkpoints `state` with the epoch's metric sums so far, from a carry that `_checked`
        passed: never a diverged state."""
        if self.checkpoints:
            self.checkpoints.save(Snapshot(self._strategy.get_state(state), epoch_totals, epoch_seconds))


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
