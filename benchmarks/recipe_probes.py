"""The cheap search behind `--recipe strong`: short training runs on a budget, one per row.

    python benchmarks/recipe_probes.py --manual_dir ../shared/data/fashion_mnist --out runs/probes
    python benchmarks/recipe_probes.py --only bn_lr0.1 bn_lr0.2 --jobs 2 ...   # a few rows

Each probe is `train.py` with the budget flags (`--resize 67 --num_epochs 3 --train_examples
20000`, all 10,000 test images) plus the flags of its row, in `<out>/<name>`; a probe whose run
is complete is read, not rerun (train.py resumes an unfinished one). `--jobs 2` runs two at a time,
each pinned to its own core. The table printed at the end is the one in docs/results.md: the last
epoch's test and train accuracy of every probe, and the command that reproduces it.
"""

import argparse
import concurrent.futures
import json
import os
import queue
import shlex
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = ["--resize", "67", "--num_epochs", "3", "--train_examples", "20000"]
# Every flag is spelled out, so that a row means the same whatever `--recipe strong` becomes.
STRONG_BEFORE = ["--momentum", "0.9", "--nesterov", "--weight_decay", "5e-4", "--label_smoothing", "0.1", "--augment"]
# The parts of the old strong recipe, with batch norm and a one-cycle schedule; each row after
# the learning rates changes one thing of the best of them.
BN_ONECYCLE = STRONG_BEFORE + ["--batch_norm", "--lr_schedule", "onecycle", "--warmup_epochs", "0.9"]

PROBES: dict[str, list[str]] = {
    "reference": [],
    "strong_before": STRONG_BEFORE + ["--learning_rate", "0.02", "--lr_schedule", "cosine", "--warmup_epochs", "1"],
    "bn_lr0.05": BN_ONECYCLE + ["--learning_rate", "0.05"],
    "bn_lr0.1": BN_ONECYCLE + ["--learning_rate", "0.1"],
    "bn_lr0.2": BN_ONECYCLE + ["--learning_rate", "0.2"],
    "bn_lr0.4": BN_ONECYCLE + ["--learning_rate", "0.4"],
    # 0.2 and 0.4 tied; the lower one is kept as the safer for runs 10 times as long.
    "bn_lr0.2_dropout0.2": BN_ONECYCLE + ["--learning_rate", "0.2", "--dropout_rate", "0.2"],
    "bn_lr0.2_no_augment": [f for f in BN_ONECYCLE if f != "--augment"] + ["--learning_rate", "0.2"],
    "bn_lr0.2_erasing0.25": BN_ONECYCLE + ["--learning_rate", "0.2", "--random_erasing", "0.25"],
    "bn_lr0.2_ema_flips": BN_ONECYCLE + ["--learning_rate", "0.2", "--ema_decay", "0.999", "--test_time_flips"],
}


def command(name: str, args) -> list[str]:
    return ["python", "train.py", *BUDGET, *PROBES[name], "--manual_dir", args.manual_dir,
            "--seed", str(args.seed), "--workdir", os.path.join(args.out, name)]


def last_epoch(workdir: str) -> dict | None:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records[-1] if records else None


def run(name: str, free_cores: queue.Queue, args) -> dict:
    """Runs (or resumes) one probe on a free core; returns its last epoch's record."""
    record = last_epoch(os.path.join(args.out, name))
    epochs = int(BUDGET[BUDGET.index("--num_epochs") + 1])
    if record is None or record["epoch"] < epochs:
        cmd = [sys.executable] + command(name, args)[1:]
        core = free_cores.get()
        if core is not None:
            cmd = ["taskset", "-c", str(core)] + cmd
        try:
            with open(os.path.join(args.out, name + ".log"), "w") as log:
                subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
        finally:
            free_cores.put(core)
        record = last_epoch(os.path.join(args.out, name))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--manual_dir", default="../shared/data/fashion_mnist")
    parser.add_argument("--out", default="runs/probes", help="one workdir per probe under it")
    parser.add_argument("--only", nargs="+", choices=sorted(PROBES), help="these probes only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="probes at a time")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    names = args.only or list(PROBES)
    free_cores = queue.Queue()
    for core in [None] if args.jobs == 1 else range(args.jobs):
        free_cores.put(core)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {name: pool.submit(run, name, free_cores, args) for name in names}
        records = {name: future.result() for name, future in futures.items()}
    print("| probe | test acc | train acc | command |")
    print("| --- | --- | --- | --- |")
    for name in names:
        r = records[name]
        shown = shlex.join(command(name, args))
        print(f"| {name} | {r['test_accuracy']:.3f} | {r['train_accuracy']:.3f} | `{shown}` |")


if __name__ == "__main__":
    main()
