"""A run's steps compiled for a target's devices: the memory of a step, the largest batch that fits,
the floating-point operations of a step, and the fastest step the target's peaks allow (`plan`).
"""

import dataclasses
import math
import os
import time
from typing import Any, Optional

from nin_jax.config import ConfigError
from nin_jax.run.cpu_estimate import xla_flops
from nin_jax.runtime.errors import first_line
from nin_jax.tools.plan import programs
from nin_jax.tools.plan.targets import GPU_PREALLOCATED, LOCAL, TARGETS, PlanError, Target, local_target, target_devices

# The modules that start JAX are imported where they are used: the command's --help and its checks
# come first, and `targets.prepare_jax` must run before JAX starts a backend.


def batch_spec(batch_size: int) -> dict[str, Any]:
    """The shapes and dtypes of one global batch as the input pipeline makes it."""
    import jax
    import numpy as np

    from nin_jax import input_pipeline

    return {"image": jax.ShapeDtypeStruct((batch_size, *input_pipeline.IMAGE_SHAPE), np.uint8),
            "label": jax.ShapeDtypeStruct((batch_size,), np.int32),
            "mask": jax.ShapeDtypeStruct((batch_size,), np.float32)}


def _strategy(config, devices):
    """The strategy `train.py` would run on these devices: pmap where asked, else jit over a mesh."""
    from nin_jax import trainer
    from nin_jax.runtime import parallel

    if config.parallel == "pmap":
        if len({device.process_index for device in devices}) > 1:
            raise PlanError("--parallel pmap is planned on one host only; this target spans several (use sharding)")
        return parallel.PmapStrategy(config, trainer.loop_steps(config), devices)
    return parallel.ShardingStrategy(config, trainer.loop_steps(config), devices)


@dataclasses.dataclass
class Compiled:
    train: Any  # jax.stages.Compiled
    eval: Any
    seconds: float

    def memory(self, which: str = "train") -> dict[str, int]:
        stats = getattr(self, which).memory_analysis()
        memory = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
                  "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
                  "code": stats.generated_code_size_in_bytes}
        memory["total"] = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"] + \
            memory["code"]
        return memory


def compile_steps(config, devices, with_eval: bool = True) -> Compiled:
    """Both steps (or the train step alone) of `config` compiled for `devices`."""
    import jax

    from nin_jax import steps
    from nin_jax.ops import choices

    config = choices.for_platform(config, devices[0].platform)
    start = time.perf_counter()
    state = jax.eval_shape(lambda: steps.create_train_state(config))
    train, evaluate = _strategy(config, devices).lower(state, batch_spec(config.batch_size))
    return Compiled(train.compile(), evaluate.compile() if with_eval else None, time.perf_counter() - start)


def step_flops(config) -> tuple[Optional[float], Optional[float]]:
    """XLA's count of the floating-point operations of one global training step and of one global
    evaluation step, from the programs for this machine's CPU (the same operations on any device):
    each lowered program's count, else the compiled one's; None where this JAX reports neither."""
    import jax

    from nin_jax import steps
    from nin_jax.ops import choices

    try:
        devices = jax.devices("cpu")[:1]
    except RuntimeError:  # JAX_PLATFORMS leaves the CPU out: the attached device's program counts the same
        devices = jax.devices()[:1]
    config = choices.for_platform(config, devices[0].platform)
    state = jax.eval_shape(lambda: steps.create_train_state(config))
    lowered = _strategy(config, devices).lower(state, batch_spec(config.batch_size))
    return tuple(xla_flops(step) or xla_flops(step.compile()) for step in lowered)


def usable_bytes(target: Target, devices: list) -> tuple[float, str]:
    """A device's memory that a run may fill, and how that figure comes about."""
    stats = devices[0].memory_stats() if target.name == LOCAL else None
    if stats and "bytes_limit" in stats:
        return float(stats["bytes_limit"]), "the pool of the attached device, as JAX reports it"
    if not target.memory_gib:  # an attached device without published figures: a CPU shares the host's memory
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "the host's memory"
    per_device = target.memory_gib * 2**30 * target.share(len(devices))
    if target.platform == "tpu":
        return per_device, f"{gib(per_device)} HBM per device"
    return per_device * GPU_PREALLOCATED, (f"{GPU_PREALLOCATED:.0%} of {gib(per_device)}, the pool JAX preallocates "
                                           f"(XLA_PYTHON_CLIENT_MEM_FRACTION)")


def largest_batch(config, devices, usable: float, first: Compiled, max_checks: int = 4) -> dict[str, Any]:
    """The largest global batch (a multiple of the devices) whose train step fits `usable` bytes per
    device, from compiles: the memory of two batch sizes fitted as a line, its answer compiled to
    check it, and the line fitted again through the two largest sizes compiled, until the answer
    stays or `max_checks` compiles are spent. Returns the largest batch seen to fit."""
    step = len(devices)

    def total_at(batch_size: int) -> float:
        """Bytes per device; infinite where the compiler itself finds that the step cannot fit (TPU)."""
        try:
            compiled = compile_steps(dataclasses.replace(config, batch_size=batch_size), devices, with_eval=False)
        except Exception as error:  # the compiler's own kinds
            if "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower():
                return math.inf
            raise
        return compiled.memory()["total"]

    fits, too_large, checks = None, None, []
    points = [(config.batch_size, first.memory()["total"]), (2 * config.batch_size, total_at(2 * config.batch_size))]
    if points[1][1] == math.inf:  # the compiler found twice the batch too large: fit below instead
        too_large, half = points.pop()[0], config.batch_size // 2 // step * step
        points += [(half, total_at(half))] if step <= half < config.batch_size else []
    if len(points) < 2 or points[1][1] == math.inf:
        return {"batch_size": None, "fitted_from": [size for size, _ in points], "checks": [], "total": None}
    while len(checks) < max_checks:
        (small, small_total), (large, large_total) = sorted(points)[-2:]
        per_example = (large_total - small_total) / (large - small)
        if per_example <= 0:
            break
        guess = int((usable - (large_total - per_example * large)) / per_example) // step * step
        if too_large is not None and guess >= too_large:  # the line is off: halve the gap instead
            low = fits or max([size for size, total in points if total <= usable], default=0)
            guess = (low + too_large) // 2 // step * step
        if guess < step or (fits is not None and guess <= fits):
            break
        total = total_at(guess)
        if total < math.inf:
            points.append((guess, total))
        checks.append({"batch_size": guess, "total": total if total < math.inf else None, "fits": total <= usable})
        if total <= usable:
            fits = guess
        else:
            too_large = guess
    fitted = [check for check in checks if check["batch_size"] == fits]
    return {"batch_size": fits, "fitted_from": [size for size, _ in points[:2]], "checks": checks,
            "total": fitted[0]["total"] if fitted else None}


def plan(config, target_name: str, num_gpus: int = 1, find_largest_batch: bool = True) -> dict[str, Any]:
    """Everything `python -m nin_jax.plan` says of one target (a name of TARGETS, or LOCAL), as a
    JSON-able dict."""
    if target_name == LOCAL:
        import jax

        devices = jax.devices()
        target = local_target(devices)
    else:
        target = TARGETS[target_name]
        devices = target_devices(target, num_gpus)
    hosts = len({device.process_index for device in devices})
    result = {"target": target.name, "description": target.description, "platform": target.platform,
              "devices": len(devices), "hosts": hosts, "recipe": config.recipe, "batch_size": config.batch_size,
              "resize": config.resize, "dtype": config.dtype, "batch_norm": config.batch_norm,
              "parallel": "pmap" if config.parallel == "pmap" else "sharding", "source": target.source}
    try:
        compiled = compile_steps(config, devices)
    except ConfigError:
        raise
    except Exception as error:  # the compiler's own kinds: its message is what the user needs
        result.update(compiled=False, error=first_line(error))
        return result
    usable, usable_note = usable_bytes(target, devices)
    memory = compiled.memory()
    result.update(compiled=True, compile_seconds=round(compiled.seconds, 1),
                  memory={**memory, "eval_total": compiled.memory("eval")["total"], "usable": usable,
                          "usable_note": usable_note, "fits": memory["total"] <= usable})
    facts = programs.program_facts(compiled.train.as_text())
    flops, eval_flops = step_flops(config)
    result.update(
        flops_per_image=flops / config.batch_size if flops else None,
        eval_flops_per_image=eval_flops / config.batch_size if eval_flops else None,
        flops_per_step_per_device=flops / len(devices) if flops else None,
        **{name: facts[name] for name in ("kernels", "collectives", "cudnn_calls", "opcodes", "entry_parameters")},
        f32_compute=programs.f32_compute(compiled.train.as_text()) if config.dtype == "bfloat16" else [],
        roofline=roofline(target, len(devices), config, flops, facts["bytes_moved"]))
    if find_largest_batch:
        result["largest_batch"] = largest_batch(config, devices, usable, compiled)
    return result


def roofline(target: Target, num_devices: int, config, flops: Optional[float], bytes_moved: int) -> dict[str, Any]:
    """The fastest step the target's peaks allow: its FLOPs at the dense peak, its bytes at the
    memory bandwidth, the larger of the two. Parts without figures are left out (None)."""
    bytes_per_device = {"bytes_moved_per_device": bytes_moved}
    if not target.bandwidth_gbs:
        return {**bytes_per_device, "step_seconds": None}
    bandwidth = target.bandwidth_gbs * 1e9 * target.share(num_devices)
    memory_seconds = bytes_moved / bandwidth
    peak, peak_name = target.peak_tflops[config.dtype]
    peak_per_device = peak * 1e12 * target.share(num_devices)
    compute_seconds = flops / num_devices / peak_per_device if flops else None
    step_seconds = max(compute_seconds or 0.0, memory_seconds)
    return {**bytes_per_device, "peak_flops_per_device": peak_per_device, "peak": f"{peak:g} TFLOP/s {peak_name}",
            "bandwidth_per_device": bandwidth, "compute_seconds": compute_seconds, "memory_seconds": memory_seconds,
            "step_seconds": step_seconds,
            "bound": "memory" if compute_seconds is None or memory_seconds > compute_seconds else "compute",
            "images_per_sec": config.batch_size / step_seconds}




def gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
