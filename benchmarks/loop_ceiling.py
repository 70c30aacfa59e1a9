"""The training loop's own cost: the fastest any accelerator can train through `nin_jax.trainer`.

    python benchmarks/loop_ceiling.py --batch_size 128

It runs the real loop (`train_and_evaluate` with a workdir: batches, transfers, progress, loss
check, metric sums, evaluation, checkpoints, metrics.jsonl, plots, TensorBoard) with train and
eval steps that do almost nothing, on random in-memory data. What remains is the host's work. It
trains twice, with short and with long epochs, and fits the fastest epoch's wall time
(evaluation excluded; the fastest, since other programs on the machine only ever add time) as
fixed seconds + steps x host seconds per step; batch / (host seconds per step) is the most
images per second the loop can feed, however fast the device.
"""

import argparse
import contextlib
import dataclasses
import tempfile
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from nin_jax.data import dataset
from nin_jax import input_pipeline, steps, trainer
from nin_jax.config import PARALLEL_MODES, Config

from common import write_json


def _sum_over_devices(metrics: steps.Metrics, axis_name) -> steps.Metrics:
    return metrics if axis_name is None else jax.lax.psum(metrics, axis_name)


def _free_metrics(batch: input_pipeline.Batch) -> steps.Metrics:
    """Finite sums that depend on the batch, so that XLA cannot fold the step away."""
    count = jnp.sum(batch["mask"])
    return {"loss_sum": 0.5 * count, "correct": jnp.zeros((), jnp.float32), "count": count}


def free_train_step(state, batch, *, axis_name=None, **unused):
    """`steps.train_step`'s signature and outputs, without the model: it only counts the step."""
    return state.replace(step=state.step + 1), _sum_over_devices(_free_metrics(batch), axis_name)


def free_eval_step(state, batch, *, axis_name=None, **unused):
    return _sum_over_devices(_free_metrics(batch), axis_name)


def random_split(num_examples: int, seed: int) -> input_pipeline.Split:
    rng = np.random.default_rng(seed)
    return input_pipeline.Split(rng.integers(0, 256, (num_examples,) + input_pipeline.IMAGE_SHAPE, dtype=np.uint8),
                                rng.integers(0, input_pipeline.NUM_CLASSES, num_examples, dtype=np.int32))


@contextlib.contextmanager
def free_steps_on_random_data(train_examples: int, eval_examples: int):
    """The loop as it is, with the steps and the dataset swapped for the free ones above."""
    datasets = {"train": random_split(train_examples, 0), "test": random_split(eval_examples, 1)}
    with mock.patch.object(steps, "train_step", free_train_step), mock.patch.object(steps, "eval_step", free_eval_step), \
            mock.patch.object(dataset, "load_datasets", return_value=datasets):
        yield


def seconds_per_epoch(config: Config, workdir: str) -> list[float]:
    """Each epoch's wall time but the first's, evaluation excluded: from one epoch line to the next."""
    line_times, eval_seconds = [], []
    evaluate = trainer.evaluate

    def timed_evaluate(*args, **kwargs):
        start = time.perf_counter()
        result = evaluate(*args, **kwargs)
        eval_seconds.append(time.perf_counter() - start)
        return result

    def log(line: str) -> None:
        if line.startswith("epoch "):
            line_times.append(time.perf_counter())

    with free_steps_on_random_data(config.train_examples, config.eval_examples), \
            mock.patch.object(trainer, "evaluate", timed_evaluate):
        trainer.train_and_evaluate(config, workdir, log=log)
    return [later - earlier - evaluated for earlier, later, evaluated in zip(line_times, line_times[1:], eval_seconds[1:])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=128)
    # Epochs long enough for each epoch's background work (the checkpoint, the files) to end within
    # the next epoch in both runs, so that it counts as fixed, as in real epochs of seconds.
    parser.add_argument("--short_steps", type=int, default=200, help="steps per epoch of the short run")
    parser.add_argument("--long_steps", type=int, default=2000, help="steps per epoch of the long run")
    parser.add_argument("--num_epochs", type=int, default=5, help="epochs per run; the first is left out")
    parser.add_argument("--parallel", default="auto", choices=PARALLEL_MODES)
    parser.add_argument("--log_every_steps", type=int, default=0, help="train.py's flag of that name")
    parser.add_argument("--checkpoint_every_steps", type=int, default=0, help="train.py's flag of that name")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    if args.num_epochs < 2 or not 0 < args.short_steps < args.long_steps:
        parser.error("need --num_epochs of at least 2 and 0 < --short_steps < --long_steps")

    fastest = {}
    for num_steps in (args.short_steps, args.long_steps):
        config = Config(resize=67, batch_size=args.batch_size, num_epochs=args.num_epochs, parallel=args.parallel,
                        train_examples=num_steps * args.batch_size, eval_examples=args.batch_size,
                        log_every_steps=args.log_every_steps, checkpoint_every_steps=args.checkpoint_every_steps)
        with tempfile.TemporaryDirectory() as workdir:
            epochs = seconds_per_epoch(config, workdir)
        fastest[num_steps] = min(epochs)
        print(f"epochs of {num_steps} steps: fastest {fastest[num_steps]:.4f} s "
              f"(epochs 2 to {args.num_epochs}: {', '.join(f'{s:.4f}' for s in epochs)})")
    step_seconds = (fastest[args.long_steps] - fastest[args.short_steps]) / (args.long_steps - args.short_steps)
    fixed_seconds = fastest[args.short_steps] - args.short_steps * step_seconds
    images_per_sec = args.batch_size / step_seconds
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s), --parallel {config.parallel}, batch {args.batch_size}")
    print(f"host work per step: {step_seconds * 1e6:.1f} us")
    print(f"fixed per epoch (evaluation excluded): {fixed_seconds:.4f} s")
    write_json(args.out, {"config": dataclasses.asdict(config), "short_steps": args.short_steps,
                          "long_steps": args.long_steps, "fastest_epoch_seconds": fastest,
                          "host_seconds_per_step": step_seconds, "fixed_seconds_per_epoch": fixed_seconds,
                          "images_per_sec": images_per_sec})
    print(f"loop ceiling at batch {args.batch_size}: {images_per_sec:.0f} images/s")


if __name__ == "__main__":
    main()
