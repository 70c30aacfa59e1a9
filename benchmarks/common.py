"""Shared pieces of the benchmarks: random batches, timing with medians, steps that take turns in
timing windows, peak memory, JSON output."""

import dataclasses
import json
import resource
import statistics
import time
from typing import Callable

import jax
import numpy as np

from nin_jax import input_pipeline
from nin_jax.ops import choices


def random_batch(batch_size: int, seed: int = 0) -> input_pipeline.Batch:
    """A full batch of random 28x28 uint8 images: the step resizes on the device, as in training."""
    rng = np.random.default_rng(seed)
    split = input_pipeline.Split(
        rng.integers(0, 256, (batch_size,) + input_pipeline.IMAGE_SHAPE, dtype=np.uint8),
        rng.integers(0, input_pipeline.NUM_CLASSES, batch_size, dtype=np.int32),
    )
    return next(input_pipeline.eval_batches(split, batch_size))


def seconds_per_call(run: Callable[[], object], calls: int,
                     wait: Callable[[object], object] = jax.block_until_ready) -> float:
    """Wall time of `calls` calls, waiting (`wait`) for the last result, divided by `calls`."""
    start = time.perf_counter()
    result = None
    for _ in range(calls):
        result = run()
    wait(result)
    return (time.perf_counter() - start) / calls


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclasses.dataclass(frozen=True)
class Contender:
    """A step to time: `step()` queues one step and returns what `wait` waits for (JAX's arrays by
    default; PyTorch's device, `compare_pytorch.torch_wait`)."""

    name: str
    step: Callable[[], object]
    wait: Callable[[object], object] = jax.block_until_ready


def alternate(contenders: list[Contender], steps_per_window: int, windows: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each contender in each of `windows` windows of `steps_per_window`
    steps, the contenders taking turns window by window so that all see the same machine noise,
    after `warmup` untimed steps of each."""
    for contender in contenders:
        for _ in range(warmup):
            contender.wait(contender.step())
    times = {contender.name: [] for contender in contenders}
    for _ in range(windows):
        for contender in contenders:
            times[contender.name].append(seconds_per_call(contender.step, steps_per_window, contender.wait))
    return times


def images_per_sec(batch_size: int, seconds_per_step: list[float]) -> dict[str, float]:
    """The median of the windows' images/s, with the slowest and the fastest window."""
    rates = sorted(batch_size / seconds for seconds in seconds_per_step)
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1]}


def median_ms(fn: Callable, args: tuple, repeats: int, cpu_kernels: str = "tuned") -> float:
    """Median wall time of `jax.jit(fn)(*args)` in ms, compiled for `--cpu_kernels`, compilation excluded."""
    fn = jax.jit(fn, compiler_options=choices.compiler_options(cpu_kernels))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * median(times)


def torch_median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of fn() in ms, after the few warm-up calls torch needs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * median(times)


def torch_module_ms(module, x, g, repeats: int, backward_name: str) -> dict[str, float]:
    """Median ms of a torch module's forward pass, and of forward + backward with cotangent g."""
    import torch

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        module.zero_grad()
        x.grad = None
        module(x).backward(g)

    return {"fwd": torch_median_ms(forward, repeats), backward_name: torch_median_ms(forward_backward, repeats)}


def add_layer_timing_flags(parser) -> None:
    """The flags the per-layer benchmarks (conv_levers, pool_levers) share."""
    from nin_jax.config import CPU_KERNELS

    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu_kernels", default="tuned", choices=CPU_KERNELS, help="train.py's --cpu_kernels")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default="", help="write the results as JSON here")


def peak_memory_bytes() -> dict[str, int]:
    """Peak host RSS, and peak accelerator memory where the backend reports it."""
    peaks = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peaks["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return peaks


def write_json(path: str, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")
