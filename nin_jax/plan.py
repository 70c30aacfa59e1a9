"""Plans a run on a GPU or a TPU slice from a machine that has neither: compiles the real train and
eval steps of `train.py`'s config for the target's devices and says whether they fit, the largest
batch that does, the kernels and collectives of a step, and the fastest step its peaks allow.

    python -m nin_jax.plan --list
    python -m nin_jax.plan --target h100 --recipe reference
    python -m nin_jax.plan --target tpu-v5e-16 --recipe strong --dtype bfloat16 --json plan.json

It needs no dataset, no TensorFlow and no accelerator: `pip install -e '.[plan]'` adds the
compilers (jax's CUDA plugin and libtpu). The recipe flags are `train.py`'s (`--help` lists them).
"""

import argparse
import collections
import dataclasses
import importlib.resources
import json
import math
import os
import re
import time
from typing import Any, Optional

if __name__ == "__main__":  # first: see nin_jax.commands
    from nin_jax import commands

    commands.begin()

from nin_jax import commands, files, platforms
from nin_jax.errors import ConfigError, OutputError

MAX_GPUS_PER_HOST = 16  # NVIDIA's HGX and DGX hosts hold 8; a few machines 16
GPU_PREALLOCATED = 0.75  # the share of a GPU's memory that JAX takes for its pool by default


@dataclasses.dataclass(frozen=True)
class Target:
    """A device to plan for, with the published figures that its roofline and memory use.

    `peak_tflops` is one device's dense peak by compute dtype, with the name of that peak.
    `topology` is a TPU topology name, or the `gpu_targets/*.txtpb` target config of a GPU.
    """

    name: str
    description: str
    platform: str  # "gpu" or "tpu"
    topology: str
    memory_gib: float  # per chip (TPU) or per GPU, as published
    bandwidth_gbs: float  # memory bandwidth per chip or GPU, GB/s
    peak_tflops: dict[str, tuple[float, str]]
    source: str
    chips: int = 0  # of a TPU slice; a TPU's devices share its chips' memory, bandwidth and peak
    kind_words: tuple[str, ...] = ()  # a GPU's: in the attached device's `device_kind`; a TPU's: all of it

    @property
    def accelerator_type(self) -> str:
        """The slice's Cloud TPU name (v5litepod-16; v4 and v5p count two cores per chip: v4-32)."""
        generation = self.topology.split(":")[0]
        cores = {"v4": 2, "v5p": 2}.get(generation, 1)
        return f"{'v5litepod' if generation == 'v5e' else generation}-{cores * self.chips}"

    def share(self, num_devices: int) -> float:
        """One device's share of a chip's (TPU) or a GPU's figures."""
        return self.chips / num_devices if self.platform == "tpu" else 1.0


def _gpu(name, description, memory_gib, bandwidth_gbs, bf16, tf32, datasheet, kind_words):
    source = (f"{datasheet}: {bf16:g} TFLOP/s bf16 and {tf32:g} TF32 dense, {memory_gib} GB at {bandwidth_gbs:,} GB/s; "
              f"the rest in nin_jax/gpu_targets/{name}.txtpb")
    return Target(name, description, "gpu", f"{name}.txtpb", memory_gib, bandwidth_gbs,
                  {"bfloat16": (bf16, "bf16 dense tensor-core peak"),
                   "float32": (tf32, "TF32 dense tensor-core peak (XLA's default for float32 convolutions and dots)")},
                  source, kind_words=kind_words)


# Per chip, from each generation's Cloud TPU documentation: HBM (GiB), its bandwidth (GB/s), the
# bf16 peak (TFLOP/s), and the `device_kind` that JAX gives its devices.
_TPU_CHIPS = {
    "v4": (32, 1200, 275.0, "TPU v4", "Google Cloud TPU v4 documentation"),
    "v5e": (16, 819, 197.0, "TPU v5 lite", "Google Cloud TPU v5e documentation"),
    "v5p": (95, 2765, 459.0, "TPU v5", "Google Cloud TPU v5p documentation"),
    "v6e": (32, 1640, 918.0, "TPU v6 lite", "Google Cloud TPU v6e (Trillium) documentation"),
}
_TPU_SLICES = ("v4:2x2x1", "v4:2x2x4", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:16x16", "v5p:2x2x1", "v5p:2x2x4",
               "v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:16x16")


def _tpu(topology: str) -> Target:
    generation, shape = topology.split(":")
    chips = math.prod(int(size) for size in shape.split("x"))
    memory_gib, bandwidth_gbs, bf16, kind, documentation = _TPU_CHIPS[generation]
    # At JAX's default precision a TPU multiplies float32 operands in bf16 passes on its matrix units.
    peaks = {dtype: (bf16, "bf16 peak of the matrix units") for dtype in ("bfloat16", "float32")}
    source = f"{documentation}: {bf16:g} TFLOP/s bf16, {memory_gib} GiB HBM at {bandwidth_gbs:,} GB/s per chip"
    return Target(f"tpu-{generation}-{chips}", f"TPU {generation}, {chips} chips ({topology})", "tpu", topology,
                  memory_gib, bandwidth_gbs, peaks, source, chips, (kind,))


TARGETS = {target.name: target for target in (
    _gpu("h100", "NVIDIA H100 SXM 80GB", 80, 3350, 989.4, 494.7, "NVIDIA H100 Tensor Core GPU datasheet (SXM5)",
         ("H100",)),
    _gpu("h200", "NVIDIA H200 SXM 141GB", 141, 4800, 989.4, 494.7, "NVIDIA H200 Tensor Core GPU datasheet (SXM)",
         ("H200",)),
    _gpu("a100", "NVIDIA A100 SXM 80GB", 80, 2039, 312.0, 156.0, "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB)",
         ("A100",)),
    _gpu("l4", "NVIDIA L4 24GB", 24, 300, 121.0, 60.0, "NVIDIA L4 Tensor Core GPU datasheet (dense, without sparsity)",
         ("L4",)),
    *map(_tpu, _TPU_SLICES),
)}


LOCAL = "local"  # the accelerator attached to this machine, compiled for as it is


def local_target(devices: list) -> Target:
    """The attached devices as a target: with the published figures of the listed target of their
    kind, or, for a kind not listed (a CPU, say), with none, and then the plan has no roofline."""
    kind = devices[0].device_kind
    for target in TARGETS.values():
        matches = kind in target.kind_words if target.platform == "tpu" else any(word in kind for word in target.kind_words)
        if target.platform == _platform(devices[0]) and matches:
            chips = len(devices) if target.platform == "tpu" else 0
            return dataclasses.replace(target, name=LOCAL, description=f"{kind} (attached)", chips=chips)
    return Target(LOCAL, f"{kind} (attached)", _platform(devices[0]), "", 0.0, 0.0, {},
                  "no published figures: not a listed target (see --list)")


def _platform(device) -> str:
    return "gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform


class PlanError(RuntimeError):
    """The plan cannot be made here (a compiler is missing, a flag does not fit the target)."""


def prepare_jax() -> None:
    """Keeps JAX on the CPU, XLA from timing GPU kernels it cannot run, and JAX off the persistent
    compilation cache (JAX_COMPILATION_CACHE_DIR), whose entries for a compile-only device it
    cannot load back: before any backend starts."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # plans side by side: there is no TPU to share
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no cloud metadata server to ask about a TPU VM
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # nor a TPU VM's workers
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_autotune_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_autotune_level=0".strip()
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_compilation_cache", False)


def gpu_target_config(target: Target) -> str:
    return (importlib.resources.files("nin_jax") / "gpu_targets" / target.topology).read_text()


CUDA_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")  # jax's CUDA 12 and CUDA 13 builds


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module.split(".")[0]) is not None and importlib.util.find_spec(module) is not None


def target_devices(target: Target, num_gpus: int = 1) -> list:
    """Compile-only devices of `target`: `num_gpus` GPUs on one host, or the whole TPU slice."""
    from jax.experimental import topologies

    modules, needs = {"gpu": (CUDA_PLUGINS, "jax's CUDA plugin"), "tpu": (("libtpu",), "libtpu")}[target.platform]
    if not any(_importable(module) for module in modules):
        raise PlanError(f"compiling for {target.description} needs {needs}: pip install -e '.[plan]'")
    if target.platform == "gpu":
        description = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(target),
                                                   topology=f"1x1x{num_gpus}")
    else:
        # What a TPU VM of this slice would set; libtpu warns at its start without it.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.accelerator_type)
        description = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
    return list(description.devices)


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
    from nin_jax import parallel

    if config.parallel == "pmap":
        if len({device.process_index for device in devices}) > 1:
            raise PlanError("--parallel pmap is planned on one host only; this target spans several (use sharding)")
        return parallel.PmapStrategy(config, devices)
    return parallel.ShardingStrategy(config, devices)


# ---------------------------------------------------------------------------------------------
# What the optimised program says: kernels, collectives, bytes.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    result: str  # its type, e.g. 'bf16[128,54,54,96]{3,2,1,0}'
    opcode: str
    operands: tuple[str, ...]  # names
    attributes: str
    computation: str


def _array_bytes(text: str) -> int:
    return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(text))


def _split_operands(rest: str) -> tuple[str, str]:
    """The text inside an instruction's parentheses, and what follows them."""
    depth = 1
    for index, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return rest[:index], rest[index + 1:]
    return rest, ""


def parse_hlo(hlo_text: str) -> list[Instruction]:
    """Every instruction of an HLO module's text, with the computation it is in ('ENTRY' for the entry)."""
    instructions, computation = [], ""
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and "{" in line:
            computation = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
            continue
        match = _INSTRUCTION.match(line)
        if match:
            name, result, opcode, rest = match.groups()
            operands, attributes = _split_operands(rest)
            instructions.append(Instruction(name, result, opcode, tuple(re.findall(r"%([\w.\-]+)", operands)),
                                            attributes, computation))
    return instructions


def program_facts(hlo_text: str) -> dict[str, Any]:
    """Kernels (by kind), collectives (count and bytes) and the bytes that the kernels read and write,
    in the ENTRY computation of an optimised per-device HLO module."""
    instructions = parse_hlo(hlo_text)
    types = {instruction.name: instruction.result for instruction in instructions}
    kernels = dict.fromkeys(("cudnn", "gemm_fusions", "cublas", "other_fusions", "copies", "transposes",
                             "collectives", "other"), 0)
    collectives: dict[str, dict[str, int]] = {}
    cudnn_calls, moved = [], 0
    for instruction in instructions:
        opcode = instruction.opcode
        if instruction.computation != "ENTRY" or opcode in _FREE or opcode.endswith("-done"):
            continue
        moved += _array_bytes(instruction.result) + sum(_array_bytes(types.get(name, "")) for name in instruction.operands)
        base = opcode.removesuffix("-start")
        if base in COLLECTIVES:
            kernels["collectives"] += 1
            entry = collectives.setdefault(base, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += _array_bytes(instruction.result)
        elif opcode == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', instruction.attributes)
            target = target.group(1) if target else ""
            kind = "cudnn" if target.startswith("__cudnn") else "cublas" if target.startswith("__cublas") else "other"
            kernels[kind] += 1
            if kind == "cudnn":
                window = re.search(r"window=\{size=([\dx]+)", instruction.attributes)
                activation = re.search(r'"activation_mode":"k(\w+)"', instruction.attributes)
                cudnn_calls.append({"target": target, "window": window.group(1) if window else "",
                                    "activation": activation.group(1) if activation else "",
                                    "operands": [_ARRAY.search(types.get(name, "")).group(0)
                                                 for name in instruction.operands if _ARRAY.search(types.get(name, ""))],
                                    "op_name": _op_name(instruction)})
        elif opcode == "fusion":
            gemm = "kind=kCustom" in instruction.attributes and re.search("gemm|triton", instruction.attributes)
            kernels["gemm_fusions" if gemm else "other_fusions"] += 1
        elif opcode == "copy":
            kernels["copies"] += 1
        elif opcode == "transpose":
            kernels["transposes"] += 1
        else:
            kernels["other"] += 1
    kernels["total"] = sum(kernels.values())
    return {"kernels": kernels, "collectives": collectives, "bytes_moved": moved, "cudnn_calls": cudnn_calls,
            "opcodes": dict(collections.Counter(instruction.opcode for instruction in instructions)),
            "entry_parameters": {instruction.name: instruction.result for instruction in instructions
                                 if instruction.computation == "ENTRY" and instruction.opcode == "parameter"}}


def _op_name(instruction: Instruction) -> str:
    """The JAX code an instruction came from, as its metadata names it."""
    origin = re.search(r'op_name="([^"]+)"', instruction.attributes)
    return origin.group(1) if origin else ""


def f32_compute(hlo_text: str) -> list[str]:
    """The convolutions and matrix products of the module (in any computation, fusions included)
    with a float32 operand, each as 'name (op_name of the JAX code that made it)'."""
    instructions = parse_hlo(hlo_text)
    types = {instruction.name: instruction.result for instruction in instructions}
    found = []
    for instruction in instructions:
        computes = instruction.opcode in ("dot", "convolution") or (
            instruction.opcode == "custom-call" and re.search(r'custom_call_target="__(cudnn|cublas)', instruction.attributes))
        if computes and any(types.get(name, "").startswith("f32[") for name in instruction.operands):
            found.append(f"{instruction.name} ({_op_name(instruction) or 'no op_name'})")
    return found


# ---------------------------------------------------------------------------------------------
# Compiling, and the memory of a compiled step.

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

    from nin_jax import kernels, steps

    config = kernels.for_platform(config, devices[0].platform)
    start = time.perf_counter()
    state = jax.eval_shape(lambda: steps.create_train_state(config))
    train, evaluate = _strategy(config, devices).lower(state, batch_spec(config.batch_size))
    return Compiled(train.compile(), evaluate.compile() if with_eval else None, time.perf_counter() - start)


def xla_flops(stage) -> Optional[float]:
    """XLA's count of the floating-point operations of a lowered or compiled step, whatever shape
    this JAX gives its cost analysis in (a dict, a list of one dict per program, None, an error);
    None where it gives none."""
    try:
        analysis = stage.cost_analysis()
    except Exception:  # a backend or a JAX without the analysis: its kinds vary
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = analysis.get("flops") if isinstance(analysis, dict) else None
    return float(flops) if flops else None


def train_flops(config) -> Optional[float]:
    """XLA's count of the floating-point operations of one global training step, from the program
    for this machine's CPU (the same operations on any device): the lowered program's count, else
    the compiled one's; None where this JAX reports neither."""
    import jax

    from nin_jax import kernels, parallel, steps

    try:
        devices = jax.devices("cpu")[:1]
    except RuntimeError:  # JAX_PLATFORMS leaves the CPU out: the attached device's program counts the same
        devices = jax.devices()[:1]
    config = kernels.for_platform(config, devices[0].platform)
    state = jax.eval_shape(lambda: steps.create_train_state(config))
    lowered, _ = parallel.ShardingStrategy(config, devices).lower(state, batch_spec(config.batch_size))
    return xla_flops(lowered) or xla_flops(lowered.compile())


def usable_bytes(target: Target, devices: list) -> tuple[float, str]:
    """A device's memory that a run may fill, and how that figure comes about."""
    stats = devices[0].memory_stats() if target.name == LOCAL else None
    if stats and "bytes_limit" in stats:
        return float(stats["bytes_limit"]), "the pool of the attached device, as JAX reports it"
    if not target.memory_gib:  # an attached device without published figures: a CPU shares the host's memory
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "the host's memory"
    per_device = target.memory_gib * 2**30 * target.share(len(devices))
    if target.platform == "tpu":
        return per_device, f"{_gib(per_device)} HBM per device"
    return per_device * GPU_PREALLOCATED, (f"{GPU_PREALLOCATED:.0%} of {_gib(per_device)}, the pool JAX preallocates "
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


# ---------------------------------------------------------------------------------------------
# The plan of one target.

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
        result.update(compiled=False, error=_first_line(error))
        return result
    usable, usable_note = usable_bytes(target, devices)
    memory = compiled.memory()
    result.update(compiled=True, compile_seconds=round(compiled.seconds, 1),
                  memory={**memory, "eval_total": compiled.memory("eval")["total"], "usable": usable,
                          "usable_note": usable_note, "fits": memory["total"] <= usable})
    facts = program_facts(compiled.train.as_text())
    flops = train_flops(config)
    result.update(
        flops_per_image=flops / config.batch_size if flops else None,
        flops_per_step_per_device=flops / len(devices) if flops else None,
        **{name: facts[name] for name in ("kernels", "collectives", "cudnn_calls", "opcodes", "entry_parameters")},
        f32_compute=f32_compute(compiled.train.as_text()) if config.dtype == "bfloat16" else [],
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


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def format_plan(result: dict[str, Any]) -> str:
    """The plan of one target as a short table."""
    config = (f"{result['recipe']} recipe, batch {result['batch_size']:,}, {result['resize']}x{result['resize']}, "
              f"{result['dtype']}, {result['parallel']}")
    devices = f"{result['devices']} {result['platform']} device{'s' if result['devices'] > 1 else ''} on " \
              f"{result['hosts']} host{'s' if result['hosts'] > 1 else ''}"
    rows = [("target", f"{result['description']}: {devices}"), ("run", config)]
    if not result["compiled"]:
        rows.append(("compiled", f"no: {result['error']}"))
        return _table(rows)
    memory = result["memory"]
    rows += [
        ("compiled", f"yes, train and eval steps in {result['compile_seconds']} s"),
        ("memory", f"per device, train step: arguments {_gib(memory['arguments'])}, outputs {_gib(memory['outputs'])} "
                   f"({_gib(memory['aliased'])} of them in donated arguments), temporaries "
                   f"{_gib(memory['temporaries'])}; total {_gib(memory['total'])} (eval step "
                   f"{_gib(memory['eval_total'])})"),
        ("fits", f"{'yes' if memory['fits'] else 'NO'}: {_gib(memory['total'])} of {_gib(memory['usable'])} "
                 f"usable ({memory['usable_note']})"),
    ]
    largest = result.get("largest_batch")
    if largest:
        if largest["batch_size"]:
            rows.append(("largest batch", f"{largest['batch_size']:,}: {_gib(largest['total'])} per device as compiled "
                                          f"(the memory of batches {largest['fitted_from'][0]:,} and "
                                          f"{largest['fitted_from'][1]:,} fitted as a line, then "
                                          f"{len(largest['checks'])} compile(s) to check and refine it)"))
        else:
            rows.append(("largest batch", "none found: no multiple of the devices fits"))
    if result["flops_per_image"]:
        rows.append(("FLOPs", f"{result['flops_per_image'] / 1e9:.2f} GFLOP per training image, "
                              f"{result['flops_per_step_per_device'] / 1e9:.1f} GFLOP per step per device"))
    else:
        rows.append(("FLOPs", "not reported by this JAX"))
    kernels = result["kernels"]
    if result["platform"] == "gpu":
        rows.append(("kernels", f"{kernels['total']} per train step: {kernels['cudnn']} cuDNN calls, "
                                f"{kernels['gemm_fusions']} GEMM fusions, {kernels['cublas']} cuBLAS calls, "
                                f"{kernels['other_fusions']} other fusions, {kernels['copies']} copies, "
                                f"{kernels['transposes']} transposes, {kernels['collectives']} collectives"))
    else:
        rows.append(("ops", f"{kernels['total']} per train step: {kernels['other_fusions'] + kernels['gemm_fusions']} "
                            f"fusions, {kernels['copies']} copies, {kernels['collectives']} collectives, "
                            f"{kernels['other'] + kernels['transposes'] + kernels['cudnn'] + kernels['cublas']} others"))
    collectives = result["collectives"]
    rows.append(("collectives", ", ".join(f"{entry['count']} {name} ({_gib(entry['bytes'])})"
                                          for name, entry in collectives.items()) + " per step per device"
                 if collectives else "none"))
    if result["dtype"] == "bfloat16":
        rows.append(("float32 compute", ", ".join(result["f32_compute"]) or "none: every convolution and dot is bf16"))
    rows.append(("roofline", _format_roofline(result["roofline"], result["description"])))
    return _table(rows)


def _format_roofline(roofline: dict[str, Any], description: str) -> str:
    moved = _gib(roofline["bytes_moved_per_device"])
    if roofline["step_seconds"] is None:
        return f"none: no published peaks for {description} ({moved} moved per step per device)"
    compute = (f"compute {roofline['compute_seconds'] * 1e3:.3f} ms at {roofline['peak']}"
               if roofline["compute_seconds"] is not None else "compute unknown (FLOPs not reported)")
    return (f"a step takes at least {roofline['step_seconds'] * 1e3:.3f} ms ({roofline['bound']}-bound: {compute}, "
            f"memory {roofline['memory_seconds'] * 1e3:.3f} ms for {moved} at "
            f"{roofline['bandwidth_per_device'] / 1e9:,.0f} GB/s): at most {roofline['images_per_sec']:,.0f} "
            f"training images/s")


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def format_targets() -> str:
    lines = [f"{'name':<13} {'platform':<8} target"]
    for target in TARGETS.values():
        lines.append(f"{target.name:<13} {target.platform:<8} {target.description}; {target.source}")
    lines.append(f"{LOCAL:<13} {'':<8} the GPU or TPU attached to this machine, with the figures of its kind above")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command line.

def build_parser() -> argparse.ArgumentParser:
    from nin_jax.config import FlagParser, add_config_flags

    parser = FlagParser(prog="python -m nin_jax.plan", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    own = parser.add_argument_group("the plan")
    own.add_argument("--target", action="append", choices=(*TARGETS, LOCAL), metavar="NAME",
                     help=f"a device to plan for (--list shows them), or {LOCAL}: the accelerator attached here; "
                          f"give it again for several")
    own.add_argument("--list", action="store_true", help="list the targets with the figures they use, then exit")
    own.add_argument("--devices", type=int, default=1, help="GPUs on one host, for a GPU target")
    own.add_argument("--json", metavar="FILE", help="also write the plans to this JSON file")
    own.add_argument("--largest_batch", action=argparse.BooleanOptionalAction, default=True,
                     help="find the largest batch that fits, by compiling two to four more train steps")
    add_config_flags(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    from nin_jax.config import parse_flags

    config, flags = parse_flags(parser, argv)
    parser.check_paths(flags, "json")
    if flags["list"]:
        print(format_targets())
        return 0
    if not flags["target"]:
        parser.error("--target is required; --list names the targets")
    if not 1 <= flags["devices"] <= MAX_GPUS_PER_HOST:  # before the compiler allocates for each
        parser.error(f"--devices must be from 1 to {MAX_GPUS_PER_HOST} (the GPUs of one host), got {flags['devices']}")
    if LOCAL in flags["target"] and len(flags["target"]) > 1:
        parser.error(f"--target {LOCAL} plans for the attached accelerator alone; plan other targets in another run")
    if flags["devices"] > 1 and any(name == LOCAL or TARGETS[name].platform != "gpu" for name in flags["target"]):
        parser.error("--devices is for listed GPU targets; a TPU target's topology, or the machine, fixes its devices")
    with commands.stops_in_one_line(parser.prog):
        try:
            if flags["json"]:
                files.check_writable(flags["json"])  # before minutes of compiling
            if config.deterministic:
                from nin_jax import kernels

                kernels.make_deterministic()  # the GPU steps compile with the deterministic kernels
            if flags["target"] != [LOCAL]:
                prepare_jax()
            else:
                found_nothing = platforms.skip_absent_accelerators(parser.prog, say=False)
                if found_nothing:
                    raise PlanError(f"--target {LOCAL} plans for the GPU or TPU attached here, and {found_nothing} "
                                    f"here; plan for a listed target instead (--list), or for this CPU with "
                                    f"JAX_PLATFORMS=cpu")
            plans, status = [], 0
            for name in flags["target"]:
                try:
                    result = plan(config, name, flags["devices"], flags["largest_batch"])
                except ConfigError as error:  # a batch that does not split over the target's devices
                    parser.error(f"{name}: {error}")
                plans.append(result)
                print(format_plan(result), end="\n\n", flush=True)
                if not result["compiled"] or not result["memory"]["fits"]:
                    status = 1
            if flags["json"]:
                files.write_text(flags["json"], json.dumps(plans, indent=2))
        except (PlanError, OutputError) as error:
            parser.exit(1, f"{parser.prog}: error: {error}\n")
    return status


if __name__ == "__main__":
    commands.run(main)
