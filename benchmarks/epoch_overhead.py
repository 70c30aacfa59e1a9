"""How much of a training epoch is not the train step: the host-side input pipeline, transfers,
progress bars and bookkeeping of the real loop (`nin_jax.trainer`), against the step alone.

    python benchmarks/epoch_overhead.py --manual_dir ../shared/data/fashion_mnist --resize 96 --train_examples 12800

It trains one epoch with `train_and_evaluate` (real data, the real loop; compilation excluded) and
times the same compiled step on one batch already on the device, before and after the epoch. The
overhead is epoch wall time / (steps x median step time) - 1; the goal is under 5%.
"""

import argparse
import dataclasses

from nin_jax import input_pipeline, trainer
from nin_jax.config import DTYPES, Config

from common import median, write_json
from step_throughput import measure


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resize", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--train_examples", type=int, default=12800, help="the epoch's length (0 = all 60,000)")
    parser.add_argument("--manual_dir", default=None, help="folder of the four Fashion-MNIST .gz files")
    parser.add_argument("--data_arrays", default=None, help="an .npz from `python -m nin_jax.export_arrays`")
    parser.add_argument("--repeats", type=int, default=5, help="step timings before and after the epoch")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    config = Config(resize=args.resize, batch_size=args.batch_size, dtype=args.dtype, num_epochs=1,
                    train_examples=args.train_examples, eval_examples=args.batch_size, manual_dir=args.manual_dir,
                    data_arrays=args.data_arrays, parallel="jit").validate()

    def step_seconds():
        return measure(config, num_steps=5, repeats=args.repeats, warmup=2)["train_step_seconds"]

    before = step_seconds()
    _, (record,) = trainer.train_and_evaluate(config, log=lambda line: None)
    after = step_seconds()
    num_steps = input_pipeline.num_batches(record["train_examples"], config.batch_size)
    step = median(before + after)
    overhead = record["train_seconds"] / (num_steps * step) - 1
    print(f"epoch of {record['train_examples']:,} examples at {args.resize} px ({num_steps} steps of {args.batch_size}): "
          f"{record['train_seconds']:.1f} s; median step {step * 1000:.1f} ms (before {median(before) * 1000:.1f}, "
          f"after {median(after) * 1000:.1f}); steps x median step {num_steps * step:.1f} s; overhead {overhead:+.1%}")
    write_json(args.out, {"config": dataclasses.asdict(config), "epoch_seconds": record["train_seconds"],
                          "num_steps": num_steps, "step_seconds_before": before, "step_seconds_after": after,
                          "overhead": overhead})


if __name__ == "__main__":
    main()
