"""Every figure of a benchmarks/accelerator.sh run in one place, in its results folder: summary.md,
which opens with the verdict on each target (the figure with its spread, what it is set against,
the ratio, pass or fail), then the recipes phase by phase, the step's images/s, the profile and the
parts; and summary.json, the same figures.

    python benchmarks/accelerator_summary.py RESULTS --batch_sizes 128 512

The targets: nin_jax's bf16 train images/s at the first batch size at least 2x the best PyTorch step
measured beside it (book, tuned or torch.compile, the same batch, dtype and device), 1.5x at the
last; the strong recipe to a test accuracy of 0.94 within 30 s of its process's start with an empty
compile cache, and within 20 s on a second run with the cache filled. A figure the run did not
measure is "not measured", with the reason.
"""

import argparse
import json
import os
import statistics
import sys

ACCURACY = 0.94
RATIO_TARGETS = ((0, 2.0), (-1, 1.5))  # (which of --batch_sizes, the least nin_jax / best PyTorch)
RECIPE_TARGETS = (("recipe_strong_cold", "cold: an empty compile cache, a fresh process", 30.0),
                  ("recipe_strong_warm", "warm: the cache that the cold run filled, a new process", 20.0))
RECIPES = ("recipe_strong_cold", "recipe_strong_warm", "recipe_reference")
PHASES = ("start-up", "data", "initial state", "compile", "epochs", "evaluations", "checkpoints", "plots and files",
          "exit")


def _read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _read_jsonl(path: str) -> list[dict]:
    """The file's whole lines: a line that a killed writer left torn is left out."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def recipe_figures(folder: str, name: str, part: dict) -> dict:
    """A recipe's run: its part's status and seconds (launch to exit), its epochs' records, and where
    its time went (benchmarks/recipe_phases.py; the exit from its start to the part's end)."""
    records = _read_jsonl(os.path.join(folder, f"{name}.jsonl"))
    phases = _read_json(os.path.join(folder, f"{name}.phases.json"), {})
    seconds = part.get("seconds")
    phase_seconds = dict(phases.get("phases_s", {}))
    if "exit_began_s" in phases and seconds is not None:
        phase_seconds["exit"] = max(0.0, seconds - phases["exit_began_s"])
    return {"status": part.get("status", "not run"), "seconds": seconds, "epochs": len(records),
            "test_accuracy": records[-1]["test_accuracy"] if records else None,
            "compile_seconds": records[0]["compile_seconds"] if records else None,
            "epoch_images_per_sec": [round(record["examples_per_sec"], 1) for record in records],
            "first_step_s": phases.get("first_step_s"), "phases_s": phase_seconds}


def _spread(rate: dict) -> str:
    return f"{rate['median']:,.0f} ({rate['min']:,.0f} to {rate['max']:,.0f})"


def _not_measured(target: str, why: str) -> dict:
    return {"target": target, "measured": "", "against": "", "ratio": "", "value": None,
            "verdict": f"not measured: {why}"}


def ratio_verdict(groups: dict, steps_status: str, batch_size: int, at_least: float) -> dict:
    """nin_jax's bf16 images/s at `batch_size` against the best PyTorch step of its group."""
    target = f"bf16 train images/s at batch {batch_size} >= {at_least:g}x the best PyTorch step on the same device"
    group = groups.get(f"bfloat16_{batch_size}")
    if group is None or group["status"] != "measured":
        return _not_measured(target, group["status"] if group else f"the steps part ({steps_status}) did not reach it")
    contenders = group["contenders"]
    pytorch = {name: result for name, result in contenders.items() if result.get("model") == "pytorch"}
    if "nin_jax" not in contenders or not pytorch:
        return _not_measured(target, "; ".join(group["notes"]) or "no PyTorch step ran beside it")
    best = max(pytorch, key=lambda name: pytorch[name]["images_per_sec"]["median"])
    ours, theirs = contenders["nin_jax"]["images_per_sec"], pytorch[best]["images_per_sec"]
    ratio = ours["median"] / theirs["median"]
    return {"target": target, "measured": f"{_spread(ours)} images/s", "against": f"{best}: {_spread(theirs)}",
            "ratio": f"{ratio:.2f}x ({ours['min'] / theirs['max']:.2f} to {ours['max'] / theirs['min']:.2f})",
            "value": ratio, "verdict": "pass" if ratio >= at_least else "fail"}


def recipe_verdict(recipe: dict, what: str, seconds_target: float) -> dict:
    """The strong recipe's run against the accuracy and its time from process start."""
    target = f"strong recipe, {what}: test accuracy >= {ACCURACY} in <= {seconds_target:g} s from process start"
    seconds, accuracy = recipe["seconds"], recipe["test_accuracy"]
    against = f"{seconds_target:g} s, accuracy {ACCURACY}"
    if recipe["status"] == "ok" and accuracy is not None:
        met = accuracy >= ACCURACY and seconds <= seconds_target
        return {"target": target, "measured": f"{seconds:.1f} s, accuracy {accuracy:.4f} (one run)",
                "against": against, "ratio": f"{seconds / seconds_target:.2f} of the time", "value": seconds,
                "verdict": "pass" if met else "fail"}
    if recipe["status"] == "ok":
        return _not_measured(target, "its run wrote no epoch's record")
    if recipe["status"].startswith("clipped") and seconds and seconds > seconds_target:
        return {"target": target, "measured": f"stopped at its deadline after {seconds:.1f} s", "against": against,
                "ratio": f"over {seconds / seconds_target:.2f} of the time", "value": seconds, "verdict": "fail"}
    return _not_measured(target, recipe["status"])


def verdicts(summary: dict, batch_sizes: list[int]) -> list[dict]:
    """One row per target, in the order of the module's docstring."""
    steps_status = next((part["status"] for part in summary["parts"] if part["part"] == "steps"), "not run")
    rows = [ratio_verdict(summary["steps"], steps_status, batch_sizes[index], at_least)
            for index, at_least in RATIO_TARGETS]
    return rows + [recipe_verdict(summary["recipes"][name], what, seconds) for name, what, seconds in RECIPE_TARGETS]


def collect(folder: str, batch_sizes: list[int]) -> dict:
    """The figures of the run in `folder`, as a JSON-able dict, with the verdicts."""
    parts = _read_jsonl(os.path.join(folder, "parts.jsonl"))
    by_name = {part["part"]: part for part in parts}
    summary = {"environment": _read_json(os.path.join(folder, "environment.json"), {}), "parts": parts,
               "recipes": {name: recipe_figures(folder, name, by_name.get(name, {})) for name in RECIPES},
               "steps": {group["group"]: group for group in _read_jsonl(os.path.join(folder, "steps.jsonl"))},
               "deterministic": _read_json(os.path.join(folder, "deterministic.json")),
               "plan_check": _read_json(os.path.join(folder, "plan_check.json"), []),
               "profile": _read_json(os.path.join(folder, "profile.json"))}
    summary["verdicts"] = verdicts(summary, batch_sizes)
    return summary


def _number(value, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _gib(value) -> str:
    return "" if value is None else f"{value / 2**30:.2f} GiB"


def format_verdicts(summary: dict, folder: str) -> list[str]:
    """The opening: the verdict table, then the machine, the versions and the command."""
    environment = summary["environment"]
    met = sum(row["verdict"] == "pass" for row in summary["verdicts"])
    versions = ", ".join(f"{name} {version}" for name, version in environment.get("versions", {}).items() if version)
    lines = [f"# nin_jax on {environment.get('device_kind', 'an unknown device')}: {met} of "
             f"{len(summary['verdicts'])} targets met", "",
             "| target | measured: median (slowest to fastest window) | against | ratio | verdict |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {row['target']} | {row['measured']} | {row['against']} | {row['ratio']} | {row['verdict']} |"
              for row in summary["verdicts"]]
    return lines + ["", f"- date: {environment.get('date', '')}",
                    f"- machine: {environment.get('nvidia_smi') or environment.get('devices')}",
                    f"- Python {environment.get('python')}, {versions}",
                    f"- command: `{environment.get('command', 'bash benchmarks/accelerator.sh ' + folder)}`"]


def format_recipes(summary: dict) -> list[str]:
    """Each recipe's run from its launch to its exit, and where the time went."""
    lines = ["", "## Recipes, from process start to exit, phase by phase (seconds)", "",
             "| run | status | seconds | test accuracy | epochs | images/s per epoch (min, median, max) | "
             "to the first step | " + " | ".join(PHASES) + " |", "| --- " * (7 + len(PHASES)) + "|"]
    for name, recipe in summary["recipes"].items():
        rates = recipe["epoch_images_per_sec"]
        spread = f"{min(rates):,.0f}, {statistics.median(rates):,.0f}, {max(rates):,.0f}" if rates else ""
        phases = " | ".join(_number(recipe["phases_s"].get(phase), 1) for phase in PHASES)
        lines.append(f"| {name.removeprefix('recipe_')} | {recipe['status']} | {_number(recipe['seconds'], 1)} | "
                     f"{_number(recipe['test_accuracy'], 4)} | {recipe['epochs']} | {spread} | "
                     f"{_number(recipe['first_step_s'], 1)} | {phases} |")
    return lines


def format_group(group: dict) -> list[str]:
    """One group of the steps part: its contenders' images/s, against nin_jax's."""
    title = f"### {group['group']}: {group['dtype']}, batch {group['batch_size']}, {group['resize']} px"
    if group["status"] != "measured":
        return ["", f"{title}: {group['status']}"]
    if "traced_steps" in group:
        return ["", f"{title}: {group['traced_steps']} steps traced by hand (no steps.json); the profile's table "
                    f"counted {group['report_steps']} ({group['report_steps_from'] or 'unknown'})"]
    ours = group["contenders"].get("nin_jax", {}).get("images_per_sec", {}).get("median")
    lines = ["", f"{title}, {group['windows']} windows of {group['steps_per_window']} steps, in "
                 f"{group['seconds']:.0f} s" + "".join(f"; {note}" for note in group["notes"]), "",
             "| step | images/s (slowest to fastest window) | nin_jax / it | set-up s (compiles) | device peak |",
             "| --- | --- | --- | --- | --- |"]
    for name, result in group["contenders"].items():
        rate = result["images_per_sec"]
        ratio = ours / rate["median"] if ours and name != "nin_jax" else None
        lines.append(f"| {name} | {_spread(rate)} | {_number(ratio, 2)} | {_number(result['setup_seconds'], 1)} | "
                     f"{_gib(result.get('device_peak_bytes'))} |")
    return lines


def format_steps(summary: dict) -> list[str]:
    """The steps part's groups, or why there are none; the deterministic step."""
    steps_part = next((part for part in summary["parts"] if part["part"] == "steps"), {})
    lines = ["", "## The train step, images/s, one process, each group's steps taking turns window by window"]
    if steps_part.get("status", "").startswith("clipped"):
        lines += ["", "The steps part was stopped at its deadline: the groups after the last one below were not reached."]
    elif not summary["steps"]:
        lines += ["", f"Not measured: the steps part {steps_part.get('status', 'did not run')}."]
    for group in summary["steps"].values():
        lines += format_group(group)
    deterministic = (summary["deterministic"] or {}).get("results", [])
    if deterministic:
        result = deterministic[0]
        low, high = result["train_images_per_sec_range"]
        lines += ["", f"With XLA's deterministic GPU kernels (a process of its own), bf16, batch "
                      f"{result['config']['batch_size']}: {result['train_images_per_sec']:,.0f} ({low:,.0f} to "
                      f"{high:,.0f}) train images/s."]
    return lines


def format_rest(summary: dict, folder: str) -> list[str]:
    """The plan against the measurement, the profile and the parts."""
    lines = []
    if summary["plan_check"]:
        lines += ["", "## The plan against the measurement", ""]
        lines += [f"- {row['dtype']}, batch {row['batch_size']}: measured {_number(row['measured_images_per_sec'])} "
                  f"images/s, roofline {_number(row['roofline_images_per_sec'])}; peak memory "
                  f"{_gib(row.get('measured_peak_bytes'))} measured, {_gib(row['planned_bytes'])} planned"
                  for row in summary["plan_check"]]
    profile_text = os.path.join(folder, "profile.txt")
    if os.path.exists(profile_text):
        with open(profile_text) as f:
            lines += ["", "## Where the bf16 step's time goes", "", "```", f.read().rstrip(), "```"]
    lines += ["", "## Parts", "", "| part | status | seconds | limit s |", "| --- | --- | --- | --- |"]
    return lines + [f"| {part['part']} | {part['status']} | {part['seconds']} | {part['limit_s']} |"
                    for part in summary["parts"]]


def format_summary(summary: dict, folder: str) -> str:
    lines = format_verdicts(summary, folder) + format_recipes(summary) + format_steps(summary)
    return "\n".join(lines + format_rest(summary, folder)) + "\n"


def main(argv=None) -> int:
    """Writes summary.md and summary.json into the results folder, and prints summary.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="the results folder of benchmarks/accelerator.sh")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[128, 512],
                        help="the run's batch sizes: the targets are at the first and the last (default 128 512)")
    args = parser.parse_args(argv)
    summary = collect(args.results, args.batch_sizes)
    text = format_summary(summary, args.results)
    with open(os.path.join(args.results, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.results, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
