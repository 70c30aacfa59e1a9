"""Where a profiled training step's time goes: a table by part of the network from a trace.

    python -m nin_jax.profile_report W/profile      # the trace that train.py --profile_steps N wrote

From the trace's device events (a GPU's kernels; on a CPU, XLA's host-side ops, which say less):
the kernel time per step, the share of the time the device was busy from the first kernel to the
last, a table of blocks 1 to 4 and the rest, forward and backward, and the ten largest kernels.
Each kernel is placed by the JAX op it came from (`jit(...)/jvp(NiN)/block1/conv/...`; under
`transpose(...)` for the backward pass): the name the trace carries, or, where the trace gives only
XLA's op name (`fusion.12`), the one in the step's optimised program, which `--profile_steps` saves
beside the trace as `train_step.hlo.txt`.

The number of train steps comes from the trace itself, as the executions of the train step's
program: the run ids its ops carry, or else its events on an "XLA Modules" line, or else the
number of times each of its ops ran (one count shared by most ops, that divides every op's count).
`steps.json`, which `--profile_steps` writes beside the trace, is a cross-check; a trace taken by
hand with `jax.profiler` has none. Where neither says, the table is of the whole trace.
"""

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
from typing import Optional

from nin_jax.runtime import files
from nin_jax.runtime.errors import OutputError

HLO_FILE = "train_step.hlo.txt"  # the profiled train step's optimised program, beside the trace
STEPS_FILE = "steps.json"  # how many train steps the trace holds, as the run that wrote it counted them
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
    run_id: str = ""  # the execution of the program it ran in, where the trace says


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


@dataclasses.dataclass(frozen=True)
class TrainStepEvents:
    """The train step's ops at one place in a trace, and its program's executions there as an
    "XLA Modules" line shows them (0 where the trace has no such line)."""

    kernels: list[Kernel]
    place: str  # '/device:GPU:0', or '/host:CPU' where there is no device but XLA's host-side ops
    module_runs: int = 0


def _is_train_module_run(event: dict) -> bool:
    """An execution of the train step's program as a whole: `jit_carried_train_step(123)`."""
    return re.fullmatch(rf"\w*{TRAIN_MODULE}(\(\d+\))?", str(event.get("name", ""))) is not None


def read_kernels(trace_path: str, op_names: dict[str, str]) -> TrainStepEvents:
    """The train step's device kernels in the trace, at the first device that ran them (or the
    host, where no device did), with the executions of its program there."""
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {event["pid"]: event.get("args", {}).get("name", "") for event in events
                 if event.get("ph") == "M" and event.get("name") == "process_name"}
    by_place, runs = collections.defaultdict(list), collections.Counter()
    for event in events:
        args = event.get("args") or {}
        if event.get("ph") != "X":
            continue
        place = processes.get(event.get("pid"), "")
        if "hlo_op" not in args and _is_train_module_run(event):
            runs[place] += 1
        if TRAIN_MODULE not in str(args.get("hlo_module", "")):
            continue
        hlo_op = str(args.get("hlo_op", ""))
        op_name = _jax_op_name(args) or op_names.get(hlo_op, "")
        by_place[place].append(Kernel(event.get("name", hlo_op), hlo_op, op_name, float(event["ts"]),
                                      float(event.get("dur", 0.0)), str(args.get("run_id", ""))))
    if not by_place:
        raise ProfileError(f"{trace_path} holds no op of the train step (an XLA module named *{TRAIN_MODULE}*)")
    devices = sorted(place for place in by_place if place.startswith("/device:"))
    place = devices[0] if devices else sorted(by_place)[0]
    return TrainStepEvents(by_place[place], place, runs[place])


def steps_in_trace(events: TrainStepEvents) -> tuple[Optional[int], str]:
    """How many times the train step's program ran in the trace, and how the trace says it; None
    where it does not say (see the module's docstring)."""
    run_ids = {kernel.run_id for kernel in events.kernels if kernel.run_id}
    if run_ids:
        return len(run_ids), "the trace's run ids"
    if events.module_runs:
        return events.module_runs, "the trace's XLA Modules line"
    counts = list(collections.Counter(kernel.hlo_op for kernel in events.kernels).values())
    most_common = collections.Counter(counts).most_common(1)[0][0]
    if math.gcd(*counts) == most_common:
        return most_common, "the trace's runs of each op"
    return None, "the runs of its ops disagree"


def _recorded_steps(directory: str) -> Optional[int]:
    """The steps that the run which wrote the trace counted (steps.json), if it left the file."""
    path = os.path.join(directory, STEPS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("steps")


def count_steps(events: TrainStepEvents, directory: str) -> dict:
    """The number of train steps to divide by (None: unknown), where it came from, and a note
    where steps.json says otherwise or must stand in for the trace."""
    traced, how = steps_in_trace(events)
    recorded = _recorded_steps(directory)
    if traced:
        note = (f"{STEPS_FILE} says {recorded}; the trace's count is used" if recorded and recorded != traced
                else "")
        return {"steps": traced, "steps_from": how, "steps_note": note}
    if recorded:
        return {"steps": recorded, "steps_from": STEPS_FILE, "steps_note": f"the trace does not say ({how})"}
    return {"steps": None, "steps_from": "", "steps_note": f"the trace does not say how many train steps it "
                                                          f"holds ({how}) and {directory} has no {STEPS_FILE}"}


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
    """The numbers of the table, from the trace in `directory` (see the module's docstring): per
    train step, or for the whole trace where the number of steps is unknown (`steps` None)."""
    trace_path = _newest_trace(directory)
    hlo_path = os.path.join(directory, HLO_FILE)
    op_names = {}
    if os.path.exists(hlo_path):
        with open(hlo_path) as f:
            op_names = op_names_of_program(f.read())
    events = read_kernels(trace_path, op_names)
    kernels, counted = events.kernels, count_steps(events, directory)
    steps = counted["steps"] or 1
    table = {part: {"forward": 0.0, "backward": 0.0} for part in PARTS}
    by_kernel = collections.defaultdict(float)
    for kernel in kernels:
        part, direction = part_of(kernel.op_name)
        table[part][direction] += kernel.duration / steps / 1e3
        by_kernel[(kernel.name, kernel.hlo_op, part, direction)] += kernel.duration / steps / 1e3
    total = sum(kernel.duration for kernel in kernels) / steps / 1e3
    share, window = busy_share(kernels)
    largest = sorted(by_kernel.items(), key=lambda item: -item[1])[:10]
    return {"trace": trace_path, "place": events.place, **counted, "kernel_ms_per_step": total,
            "window_ms_per_step": window / steps / 1e3, "busy_share": share, "named": sum(1 for k in kernels if k.op_name),
            "kernels": len(kernels), "table_ms": table,
            "largest": [{"name": name, "hlo_op": hlo_op, "part": part, "direction": direction, "ms": ms}
                        for (name, hlo_op, part, direction), ms in largest]}


def _headline(result: dict) -> list[str]:
    """The table's first lines: how many steps, from where, and what the times are of."""
    device = result["place"].startswith("/device:")
    what = "kernels" if device else "XLA's host-side ops (a CPU trace: ops overlap on its threads, and their sum " \
                                    "can pass the time they took)"
    steps = result["steps"]
    if steps:
        traced = f"{steps} traced train step{'s' if steps != 1 else ''} (by {result['steps_from']})"
        per = "per step"
    else:
        traced, per = "a trace of an unknown number of train steps", "in the whole trace"
    lines = [f"{traced} on {result['place']}: {result['kernel_ms_per_step']:.3f} ms of {what} {per}; busy "
             f"{result['busy_share']:.0%} of the {result['window_ms_per_step']:.3f} ms {per} from the first to the last"]
    if result["steps_note"]:
        lines.append(f"({result['steps_note']})")
    return lines


def format_report(result: dict) -> str:
    lines = _headline(result)
    if result["named"] < result["kernels"]:
        lines.append(f"({result['kernels'] - result['named']} of {result['kernels']} ops carry no JAX name: counted "
                     f"under the rest)")
    per = "per step" if result["steps"] else "in the whole trace"
    width = max(len(part) for part in PARTS)
    lines.append(f"{'part of the network':<{width}}  {'forward':>9}  {'backward':>9}  (ms {per})")
    for part, times in result["table_ms"].items():
        lines.append(f"{part:<{width}}  {times['forward']:>9.3f}  {times['backward']:>9.3f}")
    lines.append(f"the ten largest, ms {per}:")
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

