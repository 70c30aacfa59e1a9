"""How far `python -m nin_jax.plan` was from the truth on the attached accelerator: the measured
train images/s beside the plan's roofline bound, and the measured peak device memory beside the
planned memory, from the files that benchmarks/accelerator.sh writes into its results folder.

    python benchmarks/plan_check.py RESULTS   # reads steps.jsonl and plan_<dtype>.json, writes plan_check.json

steps.jsonl holds the groups of benchmarks/accelerator_steps.py, measured in one process: a step's
device peak is there only where it was the step's own (the process's peak rose as it was set up).
"""

import argparse
import json
import os
import sys


def compare(steps: list[dict], plans: dict[str, dict]) -> list[dict]:
    """One row per planned dtype: the nin_jax step of the same dtype, batch and size beside its plan."""
    rows = []
    for dtype, planned in plans.items():
        measured = [result for result in steps if result.get("model", "nin_jax") == "nin_jax"
                    and result["config"]["dtype"] == dtype and result["config"]["batch_size"] == planned["batch_size"]
                    and result["config"]["resize"] == planned["resize"] and result.get("parallel") == "jit"]
        if not measured or not planned.get("compiled"):
            continue
        result = measured[0]
        roofline = planned["roofline"].get("images_per_sec")
        row = {"dtype": dtype, "batch_size": planned["batch_size"], "resize": planned["resize"],
               "measured_images_per_sec": result["train_images_per_sec"], "roofline_images_per_sec": roofline,
               "measured_over_roofline": result["train_images_per_sec"] / roofline if roofline else None,
               "planned_bytes": planned["memory"]["total"]}
        if "device_peak_bytes" in result:
            row["measured_peak_bytes"] = result["device_peak_bytes"]
            row["measured_over_planned_bytes"] = result["device_peak_bytes"] / planned["memory"]["total"]
        rows.append(row)
    return rows


def format_row(row: dict) -> str:
    line = f"{row['dtype']} at batch {row['batch_size']}, {row['resize']} px: {row['measured_images_per_sec']:,.0f} train images/s"
    if row["roofline_images_per_sec"]:
        line += (f" measured against a roofline of {row['roofline_images_per_sec']:,.0f} "
                 f"({row['measured_over_roofline']:.1%} of it)")
    if "measured_peak_bytes" in row:
        line += (f"; peak device memory {row['measured_peak_bytes'] / 2**20:,.0f} MiB against "
                 f"{row['planned_bytes'] / 2**20:,.0f} MiB planned ({row['measured_over_planned_bytes']:.2f}x)")
    return line


def read_results(folder: str) -> tuple[list[dict], dict[str, dict]]:
    """nin_jax's step results, in the order measured, and the plans, by dtype, in a results folder."""
    steps = []
    with open(os.path.join(folder, "steps.jsonl")) as f:
        groups = [json.loads(line) for line in f if line.strip()]
    for group in groups:
        for result in group.get("contenders", {}).values():
            if result.get("model") == "nin_jax":  # a device peak of None was not the step's own
                own = {key: value for key, value in result.items() if key != "device_peak_bytes" or value}
                steps.append({**own, "train_images_per_sec": result["images_per_sec"]["median"]})
    plans = {}
    for dtype in ("float32", "bfloat16"):
        path = os.path.join(folder, f"plan_{dtype}.json")
        if os.path.exists(path):
            with open(path) as f:
                (plans[dtype],) = json.load(f)
    return steps, plans


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="the results folder of benchmarks/accelerator.sh")
    args = parser.parse_args()
    try:
        steps, plans = read_results(args.results)
    except (OSError, ValueError, KeyError) as error:
        sys.exit(f"plan_check.py: cannot read the results in {args.results}: {error}")
    rows = compare(steps, plans)
    if not rows:
        sys.exit(f"plan_check.py: {args.results} holds no step result with a plan of the same dtype and batch")
    for row in rows:
        print(format_row(row))
    with open(os.path.join(args.results, "plan_check.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
