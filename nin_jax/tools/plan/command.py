"""Plans a run on a GPU or a TPU slice from a machine that has neither: compiles the real steps for
the target and says whether they fit, the largest batch that does, and the fastest step its peaks allow.

`python -m nin_jax.plan`'s command line: the plan of each target as a short table, and its flags
(those of train.py that shape the steps, and the plan's own).
"""

import argparse
import json
from typing import Any

from nin_jax.config import ConfigError
from nin_jax.runtime import commands, files, platforms
from nin_jax.runtime.errors import OutputError
from nin_jax.tools.plan.planning import gib, plan
from nin_jax.tools.plan.targets import LOCAL, MAX_GPUS_PER_HOST, TARGETS, PlanError, prepare_jax


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
        ("memory", f"per device, train step: arguments {gib(memory['arguments'])}, outputs {gib(memory['outputs'])} "
                   f"({gib(memory['aliased'])} of them in donated arguments), temporaries "
                   f"{gib(memory['temporaries'])}; total {gib(memory['total'])} (eval step "
                   f"{gib(memory['eval_total'])})"),
        ("fits", f"{'yes' if memory['fits'] else 'NO'}: {gib(memory['total'])} of {gib(memory['usable'])} "
                 f"usable ({memory['usable_note']})"),
    ]
    largest = result.get("largest_batch")
    if largest:
        if largest["batch_size"]:
            rows.append(("largest batch", f"{largest['batch_size']:,}: {gib(largest['total'])} per device as compiled "
                                          f"(the memory of batches {largest['fitted_from'][0]:,} and "
                                          f"{largest['fitted_from'][1]:,} fitted as a line, then "
                                          f"{len(largest['checks'])} compile(s) to check and refine it)"))
        else:
            rows.append(("largest batch", "none found: no multiple of the devices fits"))
    if result["flops_per_image"]:
        evaluated = (f"; {result['eval_flops_per_image'] / 1e9:.2f} GFLOP per evaluated image"
                     if result["eval_flops_per_image"] else "")
        rows.append(("FLOPs", f"{result['flops_per_image'] / 1e9:.2f} GFLOP per training image, "
                              f"{result['flops_per_step_per_device'] / 1e9:.1f} GFLOP per step per device{evaluated}"))
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
    rows.append(("collectives", ", ".join(f"{entry['count']} {name} ({gib(entry['bytes'])})"
                                          for name, entry in collectives.items()) + " per step per device"
                 if collectives else "none"))
    if result["dtype"] == "bfloat16":
        rows.append(("float32 compute", ", ".join(result["f32_compute"]) or "none: every convolution and dot is bf16"))
    rows.append(("roofline", _format_roofline(result["roofline"], result["description"])))
    return _table(rows)


def _format_roofline(roofline: dict[str, Any], description: str) -> str:
    moved = gib(roofline["bytes_moved_per_device"])
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


def build_parser() -> argparse.ArgumentParser:
    from nin_jax.config import FlagParser, add_config_flags

    parser = FlagParser(prog="python -m nin_jax.plan", description=__doc__.split("\n\n")[0])
    own = parser.add_argument_group("the plan")
    own.add_argument("--target", action="append", choices=(*TARGETS, LOCAL), metavar="NAME",
                     help=f"a device to plan for (--list shows them), or {LOCAL}: the accelerator attached here; "
                          f"give it again for several")
    own.add_argument("--list", action="store_true", help="list the targets with the figures they use, then exit")
    own.add_argument("--devices", type=int, default=1, help="GPUs on one host, for a GPU target")
    own.add_argument("--json", metavar="FILE", help="also write the plans to this JSON file")
    own.add_argument("--largest_batch", action=argparse.BooleanOptionalAction, default=True,
                     help="find the largest batch that fits, by compiling two to four more train steps")
    add_config_flags(parser, PLANNED_FLAGS)
    return parser


# The flags of train.py that shape the steps the plan compiles.
PLANNED_FLAGS = ("recipe", "num_epochs", "batch_size", "learning_rate", "resize", "dtype", "dropout_rate", "weight_init",
                 "batch_norm", "momentum", "nesterov", "lr_schedule", "warmup_epochs", "weight_decay", "label_smoothing",
                 "inner_convs", "inner_kernel_size", "class_width", "head", "parallel", "cpu_kernels", "deterministic",
                 "max_pool", "conv1x1", "pool_order")


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
                from nin_jax.ops import choices

                choices.make_deterministic()  # the GPU steps compile with the deterministic kernels
            if flags["target"] != [LOCAL]:
                prepare_jax()
            else:
                found_nothing = platforms.keep_off_absent_accelerators()
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
