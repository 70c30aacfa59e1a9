"""The step figures of benchmarks/accelerator.sh, measured in one process: JAX starts once, each
configuration compiles once, and the contenders of a group (nin_jax's train step, its other forms,
a plain Flax NiN, PyTorch's steps) take turns window by window, so that all see the same machine.

    python benchmarks/accelerator_steps.py --out R/steps.jsonl --profile_dir R/profile   # on the accelerator
    python benchmarks/accelerator_steps.py --out steps.jsonl --resize 67 --batch_sizes 8 16 --steps_per_window 2 --windows 2

Each figure is the median images/s of `--windows` windows of `--steps_per_window` steps, with the
slowest and the fastest window, after `--warmup` untimed steps of each contender. The groups, in
the order of what they are worth:

  1. bf16 at the first batch size: nin_jax against each `--pytorch` step (a target: 2x the best);
  2. bf16 at the last batch size: the same (a target: 1.5x the best);
  3. the profile: `--profile_steps` steps of the first group's nin_jax step traced with
     jax.profiler into `--profile_dir`, and `nin_jax.profile_report`'s table of them, which counts
     the steps in the trace itself, into profile.txt and profile.json beside --out;
  4. bf16 at the first batch size: nin_jax, the plain Flax NiN and the other forms of the step
     (pools, 1x1 convolutions, the ReLU before the pool);
  5. fp32 at the first batch size: nin_jax, the plain NiN, the eager PyTorch steps;
  6. bf16 at the last batch size: nin_jax and the plain NiN; 7. fp32 there, as 5;
  8. nin_jax under pmap beside jit.

Each contender is set up (compiled, its first step run) once, by the first group that times it,
and kept for the groups after. Each group is one JSON line of --out as soon as it is measured, so
that a run stopped at any point keeps what it measured. A group is not started with less than
`--min_group_s` left of `--seconds`; it is written as skipped. A contender that cannot be set up
(torch.compile without a C compiler, a batch that does not fit) is left out of its group with a
note, and a group that fails is written as failed: the others go on. A contender's device peak is
its own only where the process's peak rose while it was set up; elsewhere an earlier, larger one
hides it (null).
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import jax

from nin_jax.config import Config
from nin_jax.run import profile_report
from nin_jax.runtime import compile_cache

import compare_pytorch
from common import Contender, alternate, images_per_sec, peak_memory_bytes
from step_throughput import nin_jax_steps, plain_step

NIN_JAX = ("nin_jax", {})
FORMS = (("lever_slices_conv", {"max_pool": "slices", "conv1x1": "conv"}),
         ("lever_reduce_window_conv", {"max_pool": "reduce_window", "conv1x1": "conv"}),
         ("lever_indexed_dot", {"max_pool": "indexed", "conv1x1": "dot"}),
         ("lever_relu_then_pool", {"pool_order": "relu_then_pool"}))
PMAP = ("pmap", {"parallel": "pmap"})
PYTORCH_STEPS = ("book", "tuned", "compiled")


@dataclasses.dataclass(frozen=True)
class Group:
    """Contenders that take turns: nin_jax's step in each of `forms` (a name and the Config fields
    it sets), the plain Flax NiN, PyTorch's `pytorch` steps; or, with `profile_steps`, a trace."""

    name: str
    dtype: str
    batch_size: int
    forms: tuple = (NIN_JAX,)
    plain: bool = False
    pytorch: tuple = ()
    profile_steps: int = 0


def plan(batch_sizes: list[int], pytorch: list[str], profile_steps: int) -> list[Group]:
    """The groups in the order of what they are worth (the module's docstring)."""
    first, last = batch_sizes[0], batch_sizes[-1]
    eager = tuple(step for step in pytorch if step != "compiled")
    groups = [Group(f"bfloat16_{first}", "bfloat16", first, pytorch=tuple(pytorch))]
    if last != first:
        groups.append(Group(f"bfloat16_{last}", "bfloat16", last, pytorch=tuple(pytorch)))
    if profile_steps:
        groups.append(Group("profile", "bfloat16", first, profile_steps=profile_steps))
    groups += [Group(f"forms_bfloat16_{first}", "bfloat16", first, forms=(NIN_JAX, *FORMS), plain=True),
               Group(f"float32_{first}", "float32", first, plain=True, pytorch=eager)]
    if last != first:
        groups += [Group(f"plain_bfloat16_{last}", "bfloat16", last, plain=True),
                   Group(f"float32_{last}", "float32", last, plain=True, pytorch=eager)]
    return groups + [Group(f"pmap_bfloat16_{first}", "bfloat16", first, forms=(NIN_JAX, PMAP))]


def one_line(error: Exception) -> str:
    """An error as the log and --out say it: its kind and the first line of its message."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


class Kept:
    """The contenders set up so far, each once, the first time a group asks for it: a configuration
    that several groups time compiles once in the process, and its state goes on from group to
    group. The device's peak memory is the process's and never falls: a contender's own is known
    only where the peak rose while it was set up (its compiles and its first step)."""

    def __init__(self):
        self._ready: dict[tuple, tuple[Contender, dict, Any]] = {}
        self._failed: dict[tuple, str] = {}
        self._peak_seen = 0

    def get(self, key: tuple, make: Callable[[], tuple[Contender, dict, Any]]) -> tuple[Contender, dict, Any]:
        """The contender of `key`, made by `make()` (-> contender, what it is, anything kept with
        it) and its first step run, the first time: with the seconds that took and its own peak.
        Raises RuntimeError, then and later, where it could not be set up."""
        if key in self._failed:
            raise RuntimeError(self._failed[key])
        if key not in self._ready:
            start = time.perf_counter()
            try:
                contender, info, kept = make()
                contender.wait(contender.step())
            except Exception as error:  # torch.compile without a C compiler, out of memory, ...: the others go on
                self._failed[key] = one_line(error)
                raise RuntimeError(self._failed[key]) from error
            info = {**info, "setup_seconds": time.perf_counter() - start, "device_peak_bytes": self._own_peak()}
            self._ready[key] = (contender, info, kept)
        return self._ready[key]

    def _own_peak(self) -> Optional[int]:
        """The peak now, where it rose since the last set-up: this set-up's own; else None."""
        peak = peak_memory_bytes().get("device_peak_bytes")
        if peak is None or peak <= self._peak_seen:
            return None
        self._peak_seen = peak
        return peak


def nin_jax_train(config: Config, name: str) -> tuple[Contender, dict, Callable[[], Optional[str]]]:
    """nin_jax's train step in the form that `config` sets, named `name`, what was compiled, and
    its optimised program's text (for the profile)."""
    nin_jax = nin_jax_steps(config, name)
    return nin_jax.train, nin_jax.info, nin_jax.strategy.train_program


def pytorch_missing(device: str) -> str:
    """Why PyTorch's steps cannot run beside JAX's here, or '' where they can."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    if device not in compare_pytorch.TORCH_DEVICES:
        return f"torch does not run on {device} here"
    import torch

    if device == "gpu" and not torch.cuda.is_available():
        return "this torch has no CUDA"
    return ""


def pytorch_step(args, group: Group, device: str, variant: str) -> tuple[Contender, dict, None]:
    """PyTorch's `variant` step at the group's batch and dtype, waiting for `device` once a window."""
    step = compare_pytorch.torch_step_fn(args.resize, group.batch_size, 0.1, group.dtype, device, variant)
    return Contender(f"pytorch {variant}", step, compare_pytorch.torch_wait(device)), {"model": "pytorch",
                                                                                      "variant": variant}, None


def makers(group: Group, args) -> tuple[list, list[str]]:
    """The group's contenders as (name, a function that makes it for `Kept.get`), and notes on those
    left out."""
    device, made, notes = jax.default_backend(), [], []
    for name, fields in group.forms:
        config = Config(resize=args.resize, batch_size=group.batch_size, dtype=group.dtype, **{"parallel": "jit",
                                                                                              **fields}).validate()
        made.append((name, lambda name=name, config=config: nin_jax_train(config, name)))
    if group.plain:
        config = Config(resize=args.resize, batch_size=group.batch_size, dtype=group.dtype)
        made.append(("plain", lambda: (*plain_step(config), None)))
    missing = pytorch_missing(device) if group.pytorch else ""
    if missing:
        notes.append(f"no PyTorch steps: {missing}")
    for variant in () if missing else group.pytorch:
        made.append((f"pytorch {variant}", lambda variant=variant: pytorch_step(args, group, device, variant)))
    return made, notes


def measure(group: Group, args, kept: Kept) -> dict:
    """The group's contenders, set up one after another (or kept from an earlier group), then timed
    taking turns; one that cannot be set up is left out with a note."""
    made, notes = makers(group, args)
    ready = []
    for name, make in made:
        try:
            ready.append(kept.get((name, group.dtype, group.batch_size), make)[:2])
        except RuntimeError as error:
            notes.append(f"{name} not set up: {error}")
    times = alternate([contender for contender, _ in ready], args.steps_per_window, args.windows, args.warmup)
    results = {contender.name: {**info, "step_seconds": times[contender.name],
                                "images_per_sec": images_per_sec(group.batch_size, times[contender.name])}
               for contender, info in ready}
    return {"contenders": results, "notes": notes}


def profile(group: Group, args, kept: Kept, out_folder: str) -> dict:
    """`group.profile_steps` of nin_jax's train steps traced by hand (no steps.json: the report
    counts them in the trace), and the table of where their time went."""
    config = Config(resize=args.resize, batch_size=group.batch_size, dtype=group.dtype, parallel="jit").validate()
    train, _, program = kept.get(("nin_jax", group.dtype, group.batch_size), lambda: nin_jax_train(config, "nin_jax"))
    for _ in range(args.warmup):
        train.wait(train.step())
    jax.profiler.start_trace(args.profile_dir, create_perfetto_trace=True)
    output = None
    for _ in range(group.profile_steps):
        output = train.step()
    jax.block_until_ready(output)
    jax.profiler.stop_trace()
    with open(os.path.join(args.profile_dir, profile_report.HLO_FILE), "w") as f:
        f.write(program() or "")
    report = profile_report.report(args.profile_dir)
    with open(os.path.join(out_folder, "profile.txt"), "w") as f:
        f.write(profile_report.format_report(report) + "\n")
    with open(os.path.join(out_folder, "profile.json"), "w") as f:
        json.dump(report, f, indent=2)
    return {"traced_steps": group.profile_steps, "report_steps": report["steps"],
            "report_steps_from": report["steps_from"]}


def run_group(group: Group, args, kept: Kept, deadline: float) -> dict:
    """One line of --out: the group's figures, or why it was skipped or failed."""
    record = {"group": group.name, "dtype": group.dtype, "batch_size": group.batch_size, "resize": args.resize,
              "steps_per_window": args.steps_per_window, "windows": args.windows}
    left = deadline - time.monotonic()
    if left < args.min_group_s:
        return {**record, "status": f"skipped: {left:.0f} s left of {args.seconds:.0f}, under {args.min_group_s:.0f}"}
    start = time.perf_counter()
    try:
        if group.profile_steps:
            record.update(profile(group, args, kept, os.path.dirname(os.path.abspath(args.out))))
        else:
            record.update(measure(group, args, kept))
    except Exception as error:  # the groups after it are worth their figures all the same
        return {**record, "status": f"failed: {one_line(error)}"}
    return {**record, "status": "measured", "seconds": time.perf_counter() - start}


def summary_line(record: dict) -> str:
    """What the log says of a group."""
    if record["status"] != "measured":
        return f"{record['group']}: {record['status']}"
    if "traced_steps" in record:
        return (f"profile: {record['traced_steps']} steps traced; the report counted {record['report_steps']} "
                f"({record['report_steps_from']}) in {record['seconds']:.1f} s")
    rates = ", ".join(f"{name} {result['images_per_sec']['median']:,.0f} ({result['images_per_sec']['min']:,.0f} to "
                      f"{result['images_per_sec']['max']:,.0f})" for name, result in record["contenders"].items())
    return f"{record['group']} ({record['seconds']:.1f} s): images/s {rates}" + "".join(
        f"; {note}" for note in record["notes"])


def positive(kind):
    """An argparse type: a number above 0."""
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value
    return parse


def parse_args(argv: Optional[list[str]] = None):
    """The flags, each with its default; a wrong one ends in argparse's one line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON lines file to write, one line per group")
    parser.add_argument("--resize", type=positive(int), default=224, help="image size (default 224)")
    parser.add_argument("--batch_sizes", type=positive(int), nargs="+", default=[128, 512],
                        help="the first and last batch sizes (default 128 512)")
    parser.add_argument("--pytorch", nargs="*", default=["book", "tuned"], choices=PYTORCH_STEPS,
                        help="PyTorch's steps beside nin_jax's (default book tuned; compare_pytorch.py says which is which)")
    parser.add_argument("--steps_per_window", type=positive(int), default=100, help="steps per window (default 100)")
    parser.add_argument("--windows", type=positive(int), default=5, help="windows of each contender (default 5)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps of each contender (default 10)")
    parser.add_argument("--profile_steps", type=int, default=10, help="steps traced for the profile; 0: none (default 10)")
    parser.add_argument("--profile_dir", default="", help="where the trace goes (default: profile beside --out)")
    parser.add_argument("--seconds", type=positive(float), default=float("inf"),
                        help="time for all groups, from the start (default: no limit)")
    parser.add_argument("--min_group_s", type=float, default=15.0,
                        help="a group is not started with less time left (default 15)")
    args = parser.parse_args(argv)
    args.profile_dir = args.profile_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "profile")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Every group in turn, each written to --out as soon as it is done."""
    args = parse_args(argv)
    deadline = time.monotonic() + args.seconds
    compile_cache.enable(None)  # $JAX_COMPILATION_CACHE_DIR: the groups that compile a step again load it
    kept = Kept()
    with open(args.out, "w") as out:
        for group in plan(args.batch_sizes, args.pytorch, args.profile_steps):
            record = run_group(group, args, kept, deadline)
            out.write(json.dumps(record) + "\n")
            out.flush()
            print(summary_line(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
