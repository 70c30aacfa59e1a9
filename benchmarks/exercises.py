"""The exercises at the end of the book's NiN chapter, answered by measurement: every variant trained
and timed, and the book's NiN planned, in one command that writes every table of docs/exercises.md.

    python benchmarks/exercises.py --data_arrays .data/fashion_mnist.npz --out runs/exercises

trains each variant (`--inner_convs`, `--inner_kernel_size`, `--head`, `--class_width` of train.py)
with each seed at the CPU's size below, times their train steps side by side in one process (in
turns, so that a busy machine slows each alike), and plans the book's NiN at `--plan_resize` with
`python -m nin_jax.plan` for the CPU and for the H200 at batch 1 and 128. Writes exercises.md (the
tables) and exercises.json (every figure, and each run's per-epoch records) into `--out`; each run
keeps its workdir under `--out`, so that the same command, run again, resumes the runs where they
stopped and retrains nothing that has finished. On a GPU, the same tables at the book's size:

    python benchmarks/exercises.py --resize 224 --train_examples 0 --eval_examples 0 --num_epochs 10 \\
        --batch_size 128 --out runs/exercises_224
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile

import jax

from nin_jax import models, steps, trainer
from nin_jax.config import Config
from nin_jax.runtime import compile_cache, parallel

from common import random_batch, seconds_per_call

# The chapter's exercises: a title, and the variants each compares (train.py's flags; "book" is the
# book's NiN), the book's own among them.
QUESTIONS = {
    "inner_convs": ("One, two or three 1x1 convolutions per block", ("inner_convs=1", "book", "inner_convs=3")),
    "inner_kernel_size": ("3x3 instead of 1x1 convolutions inside the blocks", ("book", "inner_kernel_size=3")),
    "dense_head": ("Global average pooling against a flatten + dense head", ("book", "head=dense")),
    "max_head": ("Global average pooling against global max pooling", ("book", "head=max")),
    "class_width": ("384x5x5 to 10x5x5 in one step, against an intermediate width",
                    ("book", "class_width=64")),
}
PLAN_TARGETS = (("local", "this CPU", {"JAX_PLATFORMS": "cpu"}), ("h200", "NVIDIA H200", {}))
PLAN_BATCH_SIZES = (1, 128)


def machine() -> str:
    """The device the runs train on, in words: a CPU's cores and model, or the accelerator's kind."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"one {device.device_kind}"
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "") if os.path.isfile("/proc/cpuinfo") else ""
    return f"{os.cpu_count()} CPU cores" + (f" ({model})" if model else "")


def variant_config(base: Config, variant: str, seed: int) -> Config:
    """`base` with the variant's flag ("name=value", or "book") and the seed."""
    if variant == "book":
        return dataclasses.replace(base, seed=seed)
    name, value = variant.split("=")
    return dataclasses.replace(base, seed=seed, **{name: type(getattr(base, name))(value)})


def parameters(config: Config) -> int:
    return models.param_count(jax.eval_shape(lambda: steps.create_train_state(config)).params)


def train(config: Config, workdir: str) -> list[dict]:
    """The run's per-epoch records: trained in `workdir`, or read there where it has finished."""
    print(f"training {workdir}", flush=True)
    _, records = trainer.train_and_evaluate(config, workdir, log=lambda line: print(f"  {line}", flush=True))
    return records


def step_milliseconds(configs: dict[str, Config], steps_per_turn: int, turns: int) -> dict[str, float]:
    """The median milliseconds of a train step of each config, timed in turns: `steps_per_turn`
    steps of each, one after the other, `turns` times over."""
    runs = {}
    for name, config in configs.items():
        strategy = parallel.create_strategy(config, trainer.loop_steps(config))
        batch, state = random_batch(config.batch_size), strategy.put_state(steps.create_train_state(config))
        strategy.compile(state, batch)
        runs[name] = {"strategy": strategy, "batch": batch, "state": state}
    times = {name: [] for name in configs}
    for _ in range(turns + 1):  # the first turn warms up
        for name, run in runs.items():
            def step(run=run):
                run["state"], carry = run["strategy"].train_step(run["state"], run["strategy"].zero_carry(), run["batch"])
                return carry  # the step donates the state it was given: the next step takes the new one

            times[name].append(seconds_per_call(step, steps_per_turn))
    return {name: 1000 * statistics.median(seconds[1:]) for name, seconds in times.items()}


def measure_variant(records_by_seed: dict[int, list[dict]]) -> dict:
    """The figures of one variant over its seeds: final test accuracy, the epoch of the best test
    accuracy (where a longer run starts to overfit), and the last epoch's train-test gap."""
    finals = {seed: records[-1] for seed, records in records_by_seed.items()}
    return {"test_accuracy": {seed: final["test_accuracy"] for seed, final in finals.items()},
            "mean_test_accuracy": statistics.mean(final["test_accuracy"] for final in finals.values()),
            "best_epoch": {seed: max(records, key=lambda r: r["test_accuracy"])["epoch"]
                           for seed, records in records_by_seed.items()},
            "gap": {seed: final["train_accuracy"] - final["test_accuracy"] for seed, final in finals.items()},
            "records": records_by_seed}


def plan(resize: int, target: str, batch_size: int, env: dict, folder: str) -> dict:
    """`python -m nin_jax.plan` of the book's NiN for `target` at this batch, as its JSON; the
    command's error line where it did not plan."""
    path = os.path.join(folder, f"plan_{target}_{batch_size}.json")
    command = [sys.executable, "-m", "nin_jax.plan", f"--target={target}", f"--resize={resize}",
               f"--batch_size={batch_size}", "--no-largest_batch", f"--json={path}"]
    print(" ".join(command[1:]), flush=True)
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if not os.path.isfile(path):
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    with open(path) as f:
        return json.load(f)[0]


def resources(resize: int, folder: str) -> dict:
    """The plans of the book's NiN for each target and batch size."""
    return {target: {batch: plan(resize, target, batch, env, folder) for batch in PLAN_BATCH_SIZES}
            for target, _, env in PLAN_TARGETS}


def _row(*cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _per_seed(values: dict, form: str) -> str:
    return " / ".join(format(value, form) for value in values.values())


def question_table(variants: dict[str, dict]) -> list[str]:
    """One question's table: a row a variant, the book's figures the reference of the times."""
    book_ms = variants["book"]["step_ms"]
    seeds = " / ".join(str(seed) for seed in variants["book"]["test_accuracy"])
    lines = [_row("variant", "parameters", f"test accuracy, seeds {seeds}", "mean", "ms per train step",
                  "time vs the book's", "best epoch", "train - test accuracy, last epoch"),
             _row(*["---"] * 8)]
    for name, figures in variants.items():
        lines.append(_row(name, f"{figures['parameters']:,}", _per_seed(figures["test_accuracy"], ".3f"),
                          f"{figures['mean_test_accuracy']:.3f}", f"{figures['step_ms']:.0f}",
                          f"{figures['step_ms'] / book_ms:.2f}x", _per_seed(figures["best_epoch"], "d"),
                          _per_seed(figures["gap"], "+.3f")))
    return lines


def epochs_table(variants: dict[str, dict]) -> list[str]:
    """Train and test accuracy of each variant at every epoch, means over the seeds: where each
    stops gaining on the test set while it still gains on the training set."""
    lines = [_row("epoch", *(f"{name}: train / test accuracy" for name in variants)), _row(*["---"] * (len(variants) + 1))]
    epochs = len(next(iter(variants["book"]["records"].values())))
    for epoch in range(epochs):
        cells = []
        for figures in variants.values():
            runs = [records[epoch] for records in figures["records"].values()]
            cells.append(" / ".join(f"{statistics.mean(r[key] for r in runs):.3f}"
                                    for key in ("train_accuracy", "test_accuracy")))
        lines.append(_row(epoch + 1, *cells))
    return lines


def resources_table(plans: dict, parameter_count: int) -> list[str]:
    """The book's NiN on each target: parameters, FLOPs and the memory of each step."""
    def figure(target, batch, read):
        result = plans[target][batch]
        return read(result) if result.get("compiled") else f"not planned: {result.get('error', '')}"

    gib = lambda size: f"{size / 2**20:,.1f} MiB"  # noqa: E731
    rows = [("parameters", lambda r: f"{parameter_count:,}", (1,)),
            ("GFLOP per image, inference (forward)", lambda r: f"{r['eval_flops_per_image'] / 1e9:.2f}", (1,)),
            ("GFLOP per image, training (forward and backward)", lambda r: f"{r['flops_per_image'] / 1e9:.2f}", (1,))]
    rows += [(f"memory of a training step, batch {batch}", lambda r: gib(r["memory"]["total"]), (batch,))
             for batch in PLAN_BATCH_SIZES]
    rows += [(f"memory of an inference step, batch {batch}", lambda r: gib(r["memory"]["eval_total"]), (batch,))
             for batch in PLAN_BATCH_SIZES]
    lines = [_row("", *(name for _, name, _ in PLAN_TARGETS)), _row(*["---"] * (len(PLAN_TARGETS) + 1))]
    for title, read, (batch,) in rows:
        lines.append(_row(title, *(figure(target, batch, read) for target, _, _ in PLAN_TARGETS)))
    return lines


def markdown(results: dict, setting: str) -> str:
    """Every table, each under its question."""
    parts = [f"Measured {setting}."]
    for question, variants in results.get("questions", {}).items():
        parts += [f"## {QUESTIONS[question][0]}", "\n".join(question_table(variants))]
        if question == "dense_head":
            parts.append("\n".join(epochs_table(variants)))
    if "resources" in results:
        parts += [f"## The resource usage of NiN (the book's, at {results['plan_resize']}x{results['plan_resize']})",
                  "\n".join(resources_table(results["resources"], results["plan_parameters"]))]
    return "\n\n".join(parts) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="runs/exercises", help="where the tables and the runs' workdirs go")
    parser.add_argument("--questions", nargs="+", default=[*QUESTIONS, "resources"], choices=[*QUESTIONS, "resources"],
                        help="which exercises to answer")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="a run of every variant with each")
    parser.add_argument("--recipe", default="strong", help="train.py's --recipe of every run")
    parser.add_argument("--resize", type=int, default=99, help="train.py's --resize: 99 is the smallest size at "
                        "which the class maps are more than one pixel (2x2)")
    parser.add_argument("--num_epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--train_examples", type=int, default=2048, help="0 = all 60,000")
    parser.add_argument("--eval_examples", type=int, default=1000, help="0 = all 10,000")
    parser.add_argument("--data_arrays", help="train.py's --data_arrays")
    parser.add_argument("--manual_dir", help="train.py's --manual_dir")
    parser.add_argument("--data_dir", help="train.py's --data_dir")
    parser.add_argument("--timing_steps", type=int, default=2, help="train steps of each variant per turn")
    parser.add_argument("--timing_turns", type=int, default=4, help="turns of timing; the median is reported")
    parser.add_argument("--compile_cache", help="train.py's --compile_cache: each variant compiles once, not once a "
                        "seed and again for the timing")
    parser.add_argument("--plan_resize", type=int, default=224, help="the size at which the resources are planned")
    return parser


def answer_questions(args, base: Config) -> dict:
    """Each question's variants trained with every seed, timed side by side and measured."""
    questions = [question for question in args.questions if question in QUESTIONS]
    variants = list(dict.fromkeys(variant for question in questions for variant in QUESTIONS[question][1]))
    figures = {}
    for variant in variants:
        records = {seed: train(variant_config(base, variant, seed),
                               os.path.join(args.out, "runs", f"{variant.replace('=', '_')}_seed{seed}"))
                   for seed in args.seeds}
        figures[variant] = {**measure_variant(records), "parameters": parameters(variant_config(base, variant, 0))}
    print("timing the train steps side by side", flush=True)
    times = step_milliseconds({variant: variant_config(base, variant, 0) for variant in variants},
                              args.timing_steps, args.timing_turns)
    return {question: {variant: {**figures[variant], "step_ms": times[variant]} for variant in QUESTIONS[question][1]}
            for question in questions}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    base = Config.from_recipe(args.recipe, resize=args.resize, num_epochs=args.num_epochs, batch_size=args.batch_size,
                              train_examples=args.train_examples, eval_examples=args.eval_examples,
                              data_arrays=args.data_arrays, manual_dir=args.manual_dir, data_dir=args.data_dir,
                              parallel="jit").validate()
    compile_cache.enable(args.compile_cache)  # before anything compiles
    os.makedirs(args.out, exist_ok=True)
    results = {"settings": vars(args), "machine": machine(), "load_before": os.getloadavg()[0]}
    results["questions"] = answer_questions(args, base)
    if "resources" in args.questions:
        with tempfile.TemporaryDirectory() as folder:
            results["resources"] = resources(args.plan_resize, folder)
        results["plan_resize"] = args.plan_resize
        results["plan_parameters"] = parameters(Config(resize=args.plan_resize))
    setting = (f"at {args.resize}x{args.resize} px, the {args.recipe} recipe, {args.num_epochs} "
               f"epoch{'s' if args.num_epochs > 1 else ''} of "
               f"{args.train_examples or 60000:,} training examples in batches of {args.batch_size}, tested on "
               f"{args.eval_examples or 10000:,}, on {results['machine']}; the load average (1 min) was "
               f"{results['load_before']:.1f} before and {os.getloadavg()[0]:.1f} after")
    with open(os.path.join(args.out, "exercises.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(args.out, "exercises.md"), "w") as f:
        f.write(markdown(results, setting))
    print(f"wrote {os.path.join(args.out, 'exercises.md')} and exercises.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
