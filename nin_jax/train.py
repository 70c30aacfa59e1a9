"""The training loop: `train_and_evaluate(config, workdir)`, the book's `train_ch6` in JAX."""

import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from nin_jax import cpu_estimate, epoch_outputs, input_pipeline, parallel, progress, reporting, steps
from nin_jax.config import Config


def _add(totals: Optional[steps.Metrics], metrics: steps.Metrics) -> steps.Metrics:
    """Running sums stay on the device, so the loop never waits for a step to finish."""
    return metrics if totals is None else jax.tree_util.tree_map(lambda a, b: a + b, totals, metrics)


def evaluate(strategy, state: steps.TrainState, split: input_pipeline.Split, batch_size: int,
             desc: str = "test") -> dict[str, float]:
    """Loss, accuracy and the number of examples counted, over every example of `split` once."""
    totals = None
    bar = progress.StepProgress(desc, len(split), batch_size)
    for batch in input_pipeline.eval_batches(split, batch_size):
        totals = _add(totals, strategy.eval_step(state, batch))
        bar.update(totals)
    bar.close()
    totals = jax.device_get(totals)
    count = int(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count, "examples": count}


def train_and_evaluate(config: Config, workdir: Optional[str] = None,
                       log: Callable[[str], None] = print) -> tuple[steps.TrainState, list[dict[str, Any]]]:
    """Trains NiN on Fashion-MNIST as `config` says; returns the final state (on the host) and one
    metrics record per epoch. With a `workdir`, the records are appended to metrics.jsonl there."""
    config = config.validate()
    if workdir:
        os.makedirs(workdir, exist_ok=True)
    reporting.write_config(workdir, config)
    datasets = input_pipeline.load_fashion_mnist(config.data_dir, config.manual_dir, config.download)
    train_split = datasets["train"].take(config.train_examples)
    test_split = datasets["test"].take(config.eval_examples)

    strategy = parallel.create_strategy(config)
    devices = parallel.describe_devices(strategy)
    state = strategy.put_state(steps.create_train_state(config))
    first_batch = next(input_pipeline.eval_batches(train_split, config.batch_size))
    compile_seconds = strategy.compile(state, first_batch)
    log(f"compiled the train and eval steps for {devices} ({strategy.name}) in {compile_seconds:.1f}s")
    if cpu_estimate.applies(config):
        log(cpu_estimate.measure_and_estimate(strategy, state, first_batch, config, len(train_split), len(test_split)))
    outputs = epoch_outputs.EpochOutputs(workdir, config)

    records = []
    for epoch in range(1, config.num_epochs + 1):
        start = time.perf_counter()
        totals = None
        bar = progress.StepProgress(f"epoch {epoch}/{config.num_epochs}", len(train_split), config.batch_size, log,
                                    config.log_every_steps)
        for batch in input_pipeline.train_batches(train_split, config.batch_size, config.seed, epoch):
            state, metrics = strategy.train_step(state, batch)
            totals = _add(totals, metrics)
            bar.update(totals)
        bar.close()
        totals = jax.device_get(totals)
        train_seconds = time.perf_counter() - start
        test = evaluate(strategy, state, test_split, config.batch_size, desc=f"epoch {epoch}/{config.num_epochs} test")
        record = {
            "epoch": epoch,
            "train_loss": float(totals["loss_sum"] / totals["count"]),
            "train_accuracy": float(totals["correct"] / totals["count"]),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "train_examples": int(totals["count"]),
            "test_examples": test["examples"],
            "examples_per_sec": float(totals["count"]) / train_seconds,
            "train_seconds": train_seconds,
            "compile_seconds": compile_seconds,
            "devices": devices,
            "parallel": strategy.name,
        }
        records.append(record)
        log(reporting.epoch_line(record, config.num_epochs))
        reporting.append_metrics(workdir, record)
        outputs.write(records)
    outputs.close()
    return strategy.get_state(state), records
