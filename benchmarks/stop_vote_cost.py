"""What the one-stop-for-all-processes vote costs a training step, on the free step of loop_ceiling.py.

    python benchmarks/stop_vote_cost.py

Every batch carries this process's stop vote into the jitted step, which sums it with the step's
other sums (`trainer.loop_steps`); with several processes the loop also reads a finished
step's summed votes. It times the free step with the vote as an input against the same step with
the vote folded in as a constant, alternating, and the read of one finished step's votes.
"""

import argparse
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from nin_jax import input_pipeline, steps
from nin_jax import trainer
from nin_jax.runtime import parallel
from nin_jax.config import Config

from common import write_json
from loop_ceiling import free_eval_step, free_train_step, random_split


def seconds_per_step(step, state, loop_carry, batch, num_steps: int) -> tuple[float, object]:
    start = time.perf_counter()
    for _ in range(num_steps):
        state, loop_carry = step(state, loop_carry, batch)
    jax.block_until_ready(loop_carry)
    return (time.perf_counter() - start) / num_steps, state


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=30, help="A B rounds; medians are reported")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()

    config = Config(resize=67, batch_size=args.batch_size, parallel="jit")
    with mock.patch.object(steps, "train_step", free_train_step), mock.patch.object(steps, "eval_step", free_eval_step):
        strategy = parallel.create_strategy(config, trainer.loop_steps(config))
        batch = next(input_pipeline.eval_batches(random_split(args.batch_size, 0), args.batch_size))
        state = strategy.put_state(steps.create_train_state(config))
        strategy.compile(state, batch)
        summed = trainer.loop_steps(config)(None).train
        no_input = jax.jit(lambda s, c, b: summed(s, c, {**b, "stop": jnp.zeros((1,), jnp.float32)}), donate_argnums=0)
        no_input = no_input.lower(state, strategy.zero_carry(), batch).compile()
    with_vote = lambda s, c, b: strategy.train_step(s, c, b, False)  # noqa: E731
    times = {"vote as input": [], "vote constant": []}
    zero = strategy.zero_carry()
    for _ in range(args.rounds):
        for name, step in (("vote as input", with_vote), ("vote constant", no_input)):
            seconds, state = seconds_per_step(step, state, zero, batch, args.steps)
            times[name].append(seconds)
    reads = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.steps):
            strategy.fetch(zero["watch"]["stop_votes"])
        reads.append((time.perf_counter() - start) / args.steps)
    medians = {name: float(np.median(seconds)) * 1e6 for name, seconds in times.items()}
    read_us = float(np.median(reads)) * 1e6
    for name, us in medians.items():
        print(f"free step with the {name}: {us:.1f} us (median of {args.rounds})")
    print(f"reading a finished step's summed votes (several processes only): {read_us:.1f} us")
    print(f"the vote costs {medians['vote as input'] - medians['vote constant']:.1f} us per step in one process, "
          f"{medians['vote as input'] - medians['vote constant'] + read_us:.1f} us with several")
    write_json(args.out, {"step_us": medians, "read_us": read_us, "step_seconds": times})


if __name__ == "__main__":
    main()
