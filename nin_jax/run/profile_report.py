"""Where a profiled training step's time goes: a table by part of the network from a trace.

    python -m nin_jax.profile_report W/profile      # the trace that train.py --profile_steps N wrote

From the trace's device events (a GPU's kernels; on a CPU, XLA's host-side ops, which say less):
the kernel time per step, the share of the time the device was busy from the first kernel to the
last, a table of blocks 1 to 4 and the rest, forward and backward, and the ten largest kernels.
Each kernel is placed by the JAX op it came from (`jit(...)/jvp(NiN)/block1/conv/...`; under
`transpose(...)` for the backward pass): the name the trace carries, or, where the trace gives only
XLA's op name (`fusion.12`), the one in the step's optimised program, which `--profile_steps` saves
beside the trace as `train_step.hlo.txt`.
"""

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
from typing import Optional

from nin_jax.runtime import files
from nin_jax.runtime.errors import OutputError

HLO_FILE = "train_step.hlo.txt"  # the profiled train step's optimised program, beside the trace
STEPS_FILE = "steps.json"  # how many train steps the trace holds
TRAIN_MODULE = "train_step"  # in the name of the train step's XLA module, e.g. jit_carried_train_step
PARTS = ("block 1", "block 2", "block 3", "block 4", "between the blocks: pools, dropout, global pool",
         "input: the resize", "the rest: loss, gradients' sums, optimizer")


class ProfileError(RuntimeError):
    """The folder holds no trace, or one without the train step's ops."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str  # the kernel's (GPU) or XLA op's (CPU) name
    hlo_op: str
    op_name: str  # the JAX op it came from, '' where unknown
    start: float  # microseconds
    duration: float


def _newest_trace(directory: str) -> str:
    runs = sorted(glob.glob(os.path.join(directory, "plugins", "profile", "*")))
    traces = [path for run in runs[-1:] for path in sorted(glob.glob(os.path.join(run, "*.trace.json.gz")))]
    if not traces:
        traces = [path for run in runs[-1:] for path in glob.glob(os.path.join(run, "perfetto_trace.json.gz"))]
    if not traces:
        raise ProfileError(f"{directory} holds no trace (plugins/profile/<run>/*.trace.json.gz): write one with "
                           f"train.py --profile_steps N --workdir W, then read W/profile")
    return traces[0]


def op_names_of_program(hlo_text: str) -> dict[str, str]:
    """Each instruction of an optimised HLO module (fusions, custom calls, copies) -> the JAX op
    that its metadata names."""
    names = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]+)\"", hlo_text,
                             re.MULTILINE):
        names.setdefault(match.group(1), match.group(2))
    return names


def _jax_op_name(args: dict) -> str:
    for key in ("name", "long_name", "tf_op"):
        value = args.get(key, "")
        if isinstance(value, str) and "jit(" in value:
            return value
    return ""


def read_kernels(trace_path: str, op_names: dict[str, str]) -> tuple[list[Kernel], str]:
    """The train step's device kernels in the trace, and where they ran ('/device:GPU:0', or
    '/host:CPU' where there is no device but XLA's host-side ops)."""
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {event["pid"]: event.get("args", {}).get("name", "") for event in events
                 if event.get("ph") == "M" and event.get("name") == "process_name"}
    by_place = collections.defaultdict(list)
    for event in events:
        args = event.get("args") or {}
        if event.get("ph") != "X" or TRAIN_MODULE not in str(args.get("hlo_module", "")):
            continue
        hlo_op = str(args.get("hlo_op", ""))
        op_name = _jax_op_name(args) or op_names.get(hlo_op, "")
        by_place[processes.get(event.get("pid"), "")].append(
            Kernel(event.get("name", hlo_op), hlo_op, op_name, float(event["ts"]), float(event.get("dur", 0.0))))
    if not by_place:
        raise ProfileError(f"{trace_path} holds no op of the train step (an XLA module named *{TRAIN_MODULE}*)")
    devices = sorted(place for place in by_place if place.startswith("/device:"))
    place = devices[0] if devices else sorted(by_place)[0]
    return by_place[place], place


def part_of(op_name: str) -> tuple[str, str]:
    """(part of the network, 'forward' or 'backward') of a JAX op name."""
    direction = "backward" if "transpose(" in op_name else "forward"
    block = re.search(r"/block(\d+)/", op_name)
    if block:
        return f"block {block.group(1)}", direction
    if "_resize" in op_name or "/resize" in op_name:
        return PARTS[5], direction
    if "(NiN)" in op_name:
        return PARTS[4], direction
    return PARTS[6], direction


def busy_share(kernels: list[Kernel]) -> tuple[float, float]:
    """The union of the kernels' intervals over the time from the first start to the last end,
    and that time, in microseconds."""
    spans = sorted((kernel.start, kernel.start + kernel.duration) for kernel in kernels)
    busy, end = 0.0, spans[0][0]
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    window = max(stop for _, stop in spans) - spans[0][0]
    return (busy / window if window else 1.0), window


def report(directory: str) -> dict:
    """The numbers of the table, from the trace in `directory` (see the module's docstring)."""
    trace_path = _newest_trace(directory)
    hlo_path = os.path.join(directory, HLO_FILE)
    op_names = {}
    if os.path.exists(hlo_path):
        with open(hlo_path) as f:
            op_names = op_names_of_program(f.read())
    kernels, place = read_kernels(trace_path, op_names)
    steps = None
    steps_path = os.path.join(directory, STEPS_FILE)
    if os.path.exists(steps_path):
        with open(steps_path) as f:
            steps = json.load(f).get("steps")
    steps = steps or 1
    table = {part: {"forward": 0.0, "backward": 0.0} for part in PARTS}
    by_kernel = collections.defaultdict(float)
    for kernel in kernels:
        part, direction = part_of(kernel.op_name)
        table[part][direction] += kernel.duration / steps / 1e3
        by_kernel[(kernel.name, kernel.hlo_op, part, direction)] += kernel.duration / steps / 1e3
    total = sum(kernel.duration for kernel in kernels) / steps / 1e3
    share, window = busy_share(kernels)
    largest = sorted(by_kernel.items(), key=lambda item: -item[1])[:10]
    return {"trace": trace_path, "place": place, "steps": steps, "kernel_ms_per_step": total,
            "window_ms_per_step": window / steps / 1e3, "busy_share": share, "named": sum(1 for k in kernels if k.op_name),
            "kernels": len(kernels), "table_ms": table,
            "largest": [{"name": name, "hlo_op": hlo_op, "part": part, "direction": direction, "ms": ms}
                        for (name, hlo_op, part, direction), ms in largest]}


def format_report(result: dict) -> str:
    device = result["place"].startswith("/device:")
    what = "kernels" if device else "XLA's host-side ops (a CPU trace: ops overlap on its threads, and their sum " \
                                    "can pass the time they took)"
    lines = [f"{result['steps']} traced train step{'s' if result['steps'] != 1 else ''} on {result['place']}: "
             f"{result['kernel_ms_per_step']:.3f} ms of {what} per step; busy {result['busy_share']:.0%} of the "
             f"{result['window_ms_per_step']:.3f} ms per step from the first to the last"]
    if result["named"] < result["kernels"]:
        lines.append(f"({result['kernels'] - result['named']} of {result['kernels']} ops carry no JAX name: counted "
                     f"under the rest)")
    width = max(len(part) for part in PARTS)
    lines.append(f"{'part of the network':<{width}}  {'forward':>9}  {'backward':>9}  (ms per step)")
    for part, times in result["table_ms"].items():
        lines.append(f"{part:<{width}}  {times['forward']:>9.3f}  {times['backward']:>9.3f}")
    lines.append("the ten largest, ms per step:")
    for kernel in result["largest"]:
        share = kernel["ms"] / result["kernel_ms_per_step"] if result["kernel_ms_per_step"] else 0.0
        lines.append(f"  {kernel['ms']:8.3f} {share:6.1%}  {kernel['part']}, {kernel['direction']}: "
                     f"{kernel['name'][:90]} ({kernel['hlo_op']})")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nin_jax.profile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", help="the folder that train.py --profile_steps wrote (W/profile)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    try:
        result = report(args.profile)
        print(format_report(result))
        if args.json:
            files.write_text(args.json, json.dumps(result, indent=2))
    except (ProfileError, OutputError, OSError, ValueError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    return 0

