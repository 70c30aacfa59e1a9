"""Images/s of nin_jax's train and eval steps on one in-memory NumPy batch, handed over as the loop does.

    python benchmarks/step_throughput.py --resize 224 --batch_size 128 --dtype float32
    python benchmarks/step_throughput.py --resize 224 --batch_size 128 256 512 --dtype float32 bfloat16
    python benchmarks/step_throughput.py --resize 224 --batch_size 128 --cpu_kernels tuned default
    python benchmarks/step_throughput.py --resize 224 --max_pool slices indexed reduce_window --conv1x1 dot conv
    python benchmarks/step_throughput.py --resize 224 --model plain   # a plain Flax NiN (benchmarks/plain_flax.py)
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/step_throughput.py --parallel pmap

Compilation is timed separately; warm-up steps are excluded; the train and eval steps take turns
in `--repeats` windows of `--steps` steps, and each figure is the median of the windows, with the
slowest and the fastest. The device's peak memory is the process's: it is reported for the first
configuration only, so run one configuration per process to have each one's. `--model plain`
times the train step only, on images already resized. benchmarks/accelerator_steps.py measures
these steps, their other forms and PyTorch's in one process for benchmarks/accelerator.sh.
"""

import argparse
import dataclasses
import itertools
import time
from typing import Any, NamedTuple

import jax

from nin_jax import trainer
from nin_jax.runtime import compile_cache, parallel
from nin_jax import steps
from nin_jax.config import CPU_KERNELS, DTYPES, PARALLEL_MODES, Config
from nin_jax.ops.choices import CHOICES

import plain_flax
from common import Contender, alternate, images_per_sec, peak_memory_bytes, random_batch, write_json


class NinJaxSteps(NamedTuple):
    train: Contender
    eval: Contender
    info: dict  # what was compiled, for how long, on which devices
    strategy: Any  # its train_program() is the compiled train step's optimised program


def nin_jax_steps(config: Config, name: str = "nin_jax") -> NinJaxSteps:
    """nin_jax's train and eval steps for `config`, compiled, on one batch of random images handed
    over as the loop hands its batches over; the train step carries its state on from step to step."""
    strategy = parallel.create_strategy(config, trainer.loop_steps(config))
    batch = random_batch(config.batch_size)
    state = strategy.put_state(steps.create_train_state(config))
    compile_seconds = strategy.compile(state, batch)

    def train_once():
        nonlocal state
        state, carry = strategy.train_step(state, strategy.zero_carry(), batch)
        return carry

    eval_once = lambda: strategy.eval_step(state, strategy.zero_totals(), batch)  # noqa: E731
    info = {"model": "nin_jax", "config": dataclasses.asdict(config), "devices": parallel.describe_devices(strategy),
            "parallel": strategy.name, "compile_seconds": compile_seconds}
    return NinJaxSteps(Contender(name, train_once), Contender(f"{name} eval", eval_once), info, strategy)


def plain_step(config: Config) -> tuple[Contender, dict]:
    """The plain Flax NiN's train step at the config's size, batch and dtype, compiled."""
    compile_seconds, step = plain_flax.step_timer(config.resize, config.batch_size, config.dtype)
    info = {"model": "plain", "config": dataclasses.asdict(config), "devices": f"1 {jax.default_backend()} device",
            "parallel": "jit", "compile_seconds": compile_seconds}
    return Contender("plain", step), info


def timings(kind: str, batch_size: int, seconds_per_step: list[float]) -> dict:
    """A step's windows as step_throughput.py reports them: seconds per step, images/s and their range."""
    rates = images_per_sec(batch_size, seconds_per_step)
    return {f"{kind}_step_seconds": seconds_per_step, f"{kind}_images_per_sec": rates["median"],
            f"{kind}_images_per_sec_range": [rates["min"], rates["max"]]}


def measure(config: Config, num_steps: int, repeats: int, warmup: int) -> dict:
    """nin_jax's train and eval steps, taking turns window by window."""
    nin_jax = nin_jax_steps(config)
    times = alternate([nin_jax.train, nin_jax.eval], num_steps, repeats, warmup)
    return {**nin_jax.info, **timings("train", config.batch_size, times[nin_jax.train.name]),
            **timings("eval", config.batch_size, times[nin_jax.eval.name])}


def measure_plain(config: Config, num_steps: int, repeats: int, warmup: int) -> dict:
    """The plain Flax NiN's train step at the config's size, batch and dtype."""
    step, info = plain_step(config)
    return {**info, **timings("train", config.batch_size, alternate([step], num_steps, repeats, warmup)[step.name])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resize", type=int, default=224)
    parser.add_argument("--batch_size", type=int, nargs="+", default=[128], help="one or more global batch sizes")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=DTYPES,
                        help="one or more compute dtypes")
    parser.add_argument("--cpu_kernels", nargs="+", default=["tuned"], choices=CPU_KERNELS,
                        help="one or more of train.py's --cpu_kernels (nin_jax/ops/choices.py)")
    parser.add_argument("--max_pool", nargs="+", default=["auto"], choices=CHOICES["max_pool"],
                        help="one or more of train.py's --max_pool (nin_jax/ops/choices.py)")
    parser.add_argument("--conv1x1", nargs="+", default=["auto"], choices=CHOICES["conv1x1"],
                        help="one or more of train.py's --conv1x1 (nin_jax/ops/choices.py)")
    parser.add_argument("--pool_order", nargs="+", default=["auto"], choices=CHOICES["pool_order"],
                        help="one or more of train.py's --pool_order (nin_jax/ops/choices.py)")
    parser.add_argument("--parallel", default="auto", choices=PARALLEL_MODES)
    parser.add_argument("--model", default="nin_jax", choices=("nin_jax", "plain"),
                        help="nin_jax's steps, or a plain Flax NiN's train step (benchmarks/plain_flax.py)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timing window")
    parser.add_argument("--repeats", type=int, default=5, help="timing windows; the median is reported, with the range")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    compile_cache.enable(None)  # as train.py: $JAX_COMPILATION_CACHE_DIR or the default folder
    print(f"{'resize':>6} {'batch':>5} {'dtype':>8} {'cpu kernels':>11} {'max pool':>13} {'1x1':>4} {'devices':>14} "
          f"{'compile s':>9} {'train img/s':>11} {'eval img/s':>10}")
    results = []
    grid = itertools.product(args.dtype, args.batch_size, args.cpu_kernels, args.max_pool, args.conv1x1,
                             args.pool_order)
    for dtype, batch_size, cpu_kernels, max_pool, conv1x1, pool_order in grid:
        config = Config(resize=args.resize, batch_size=batch_size, dtype=dtype, parallel=args.parallel,
                        cpu_kernels=cpu_kernels, max_pool=max_pool, conv1x1=conv1x1, pool_order=pool_order).validate()
        start = time.perf_counter()
        result = (measure_plain if args.model == "plain" else measure)(config, args.steps, args.repeats, args.warmup)
        result["wall_seconds"] = time.perf_counter() - start
        peaks = peak_memory_bytes()
        if results:  # the device's peak is the process's, the first configuration's only
            peaks.pop("device_peak_bytes", None)
        results.append({**result, **peaks})
        print(f"{args.resize:>6} {batch_size:>5} {dtype:>8} {cpu_kernels:>11} {max_pool:>13} {conv1x1:>4} {result['devices']:>14} "
              f"{result['compile_seconds']:>9.1f} {result['train_images_per_sec']:>11.1f} "
              f"{result.get('eval_images_per_sec', float('nan')):>10.1f}", flush=True)
    write_json(args.out, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
