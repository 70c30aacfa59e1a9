"""The devices a plan compiles for: GPUs and TPU slices with their published figures (memory,
bandwidth, peaks), and their compile-only devices from `jax.experimental.topologies`.
"""

import dataclasses
import importlib.resources
import math
import os

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
    return (importlib.resources.files("nin_jax.tools.plan") / "gpu_targets" / target.topology).read_text()


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
