"""Every figure of a benchmarks/accelerator.sh run in one place: summary.md (tables, with the
machine, the versions and the command) and summary.json (the same figures), in its results folder.

    python benchmarks/accelerator_summary.py RESULTS
"""

import argparse
import glob
import json
import os
import statistics
import sys


def _read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _read_jsonl(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def collect(folder: str) -> dict:
    """The figures of the run in `folder`, as a JSON-able dict."""
    parts = {part["part"]: part for part in _read_jsonl(os.path.join(folder, "parts.jsonl"))}
    recipes = {}
    for name in ("recipe_reference", "recipe_strong", "recipe_strong_again"):
        records = _read_jsonl(os.path.join(folder, f"{name}.jsonl"))
        part = parts.get(name, {})
        recipes[name] = {
            "status": part.get("status", "not run"), "seconds": part.get("seconds"),
            "epochs": len(records), "compile_seconds": records[0]["compile_seconds"] if records else None,
            "epoch_images_per_sec": [round(r["examples_per_sec"], 1) for r in records],
            "test_accuracy": records[-1]["test_accuracy"] if records else None}
    steps = {}
    for path in sorted(glob.glob(os.path.join(folder, "steps", "*.json"))):
        payload = _read_json(path, {})
        for result in payload.get("results", []):
            name = os.path.basename(path).removesuffix(".json")
            steps[name] = {key: result.get(key) for key in ("model", "parallel", "train_images_per_sec",
                                                             "eval_images_per_sec", "compile_seconds",
                                                             "device_peak_bytes")}
            steps[name].update({key: result["config"][key] for key in ("dtype", "batch_size", "resize", "max_pool",
                                                                      "conv1x1", "pool_order")})
    pytorch = {}
    for path in sorted(glob.glob(os.path.join(folder, "pytorch_*.json"))):
        payload = _read_json(path, {})
        if payload:
            pytorch[os.path.basename(path).removesuffix(".json")] = {
                "dtype": payload["args"]["dtype"], "batch_size": payload["args"]["batch_size"],
                "images_per_sec": payload["images_per_sec"], "ratios": payload.get("ratios", {}),
                "torch": payload.get("torch_version")}
    return {"environment": _read_json(os.path.join(folder, "environment.json"), {}), "recipes": recipes,
            "steps": steps, "pytorch": pytorch, "plan_check": _read_json(os.path.join(folder, "plan_check.json"), []),
            "profile": _read_json(os.path.join(folder, "profile.json")), "parts": list(parts.values())}


def _number(value, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _gib(value) -> str:
    return "" if value is None else f"{value / 2**30:.2f} GiB"


def format_summary(summary: dict, folder: str) -> str:
    environment = summary["environment"]
    versions = ", ".join(f"{name} {version}" for name, version in environment.get("versions", {}).items() if version)
    lines = [f"# nin_jax on {environment.get('device_kind', 'an unknown device')}", "",
             f"- machine: {environment.get('nvidia_smi') or environment.get('devices')}",
             f"- Python {environment.get('python')}, {versions}",
             f"- command: `{environment.get('command', 'bash benchmarks/accelerator.sh ' + folder)}`", "",
             "## Recipes, from process start to end", "",
             "| run | status | seconds | compile s | epochs | images/s per epoch (min, median, max) | test accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, recipe in summary["recipes"].items():
        rates = recipe["epoch_images_per_sec"]
        spread = (f"{min(rates):,.0f}, {statistics.median(rates):,.0f}, {max(rates):,.0f}" if rates else "")
        lines.append(f"| {name.removeprefix('recipe_')} | {recipe['status']} | {_number(recipe['seconds'], 1)} | "
                     f"{_number(recipe['compile_seconds'], 1)} | {recipe['epochs']} | {spread} | "
                     f"{_number(recipe['test_accuracy'], 4)} |")
    steps = summary["steps"]
    lines += ["", "## Train step, images/s (each configuration in a process of its own)", "",
              "| dtype, batch | nin_jax train | nin_jax eval | plain Flax NiN train | nin_jax / plain | "
              "nin_jax compile s | device peak: nin_jax, plain |", "| --- | --- | --- | --- | --- | --- | --- |"]
    grid = sorted((name for name in steps if name.startswith("nin_jax_")),
                  key=lambda name: (steps[name]["batch_size"], steps[name]["dtype"]))
    for name in grid:
        result = steps[name]
        plain = steps.get(name.replace("nin_jax_", "plain_"), {})
        ratio = (result["train_images_per_sec"] / plain["train_images_per_sec"]
                 if plain.get("train_images_per_sec") else None)
        lines.append(f"| {result['dtype']}, {result['batch_size']} | {_number(result['train_images_per_sec'])} | "
                     f"{_number(result['eval_images_per_sec'])} | {_number(plain.get('train_images_per_sec'))} | "
                     f"{_number(ratio, 2)} | {_number(result['compile_seconds'], 1)} | "
                     f"{_gib(result['device_peak_bytes'])}, {_gib(plain.get('device_peak_bytes'))} |")
    lines += ["", "## Other forms of the step (train images/s)", "",
              "| step | max pool | 1x1 | pool order | dtype, batch | train | eval |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, result in steps.items():
        if name.startswith(("lever_", "pmap_", "deterministic_")):
            lines.append(f"| {name} | {result['max_pool']} | {result['conv1x1']} | {result['pool_order']} | {result['dtype']}, "
                         f"{result['batch_size']} | {_number(result['train_images_per_sec'])} | "
                         f"{_number(result['eval_images_per_sec'])} |")
    lines += ["", "## PyTorch on the same device, alternating with nin_jax in one process", "",
              "| run | dtype, batch | step | images/s | nin_jax / it |", "| --- | --- | --- | --- | --- |"]
    for name, run in summary["pytorch"].items():
        for step, rate in run["images_per_sec"].items():
            ratio = run["ratios"].get(step)
            lines.append(f"| {name} | {run['dtype']}, {run['batch_size']} | {step} | {_number(rate)} | "
                         f"{_number(ratio, 2)} |")
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
    lines += [f"| {part['part']} | {part['status']} | {part['seconds']} | {part['limit_s']} |"
              for part in summary["parts"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="the results folder of benchmarks/accelerator.sh")
    args = parser.parse_args()
    summary = collect(args.results)
    text = format_summary(summary, args.results)
    with open(os.path.join(args.results, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.results, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
