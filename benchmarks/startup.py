"""Where a short training command spends its start-up: imports, data, parameters, compiling, the
first step; and the whole command, cold (empty compilation cache) and warm (the cache filled).

    python benchmarks/startup.py --manual_dir ../shared/data/fashion_mnist --resize 224 --repeats 3

Each phase is timed in a fresh process, `--repeats` times, with the compilation cache warm; the
medians are printed. The command is `train.py --num_epochs 1 --train_examples 8 --eval_examples 8
--batch_size 8 --workdir <new folder>` at `--resize`, run in a subprocess, first with a new, empty
cache folder and then again with it filled. The dataset must be readable (built, or `--manual_dir`
to build it); the copy of it that `nin_jax.input_pipeline` keeps is left as it is.
"""

# Only the standard library up here: the phase "import" times the project's imports.
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("import", "data", "init", "compile", "first_step")


def time_phases(args) -> dict:
    """Seconds of each start-up phase in this fresh process, as `train.py` goes through them."""
    seconds = {}
    start = time.perf_counter()
    sys.path.insert(0, REPO_ROOT)
    import jax

    import train  # noqa: F401  (the command line's imports)
    from nin_jax import input_pipeline, steps, trainer
    from nin_jax.config import Config
    from nin_jax.data import dataset
    from nin_jax.runtime import compile_cache, parallel

    seconds["import"] = time.perf_counter() - start
    compile_cache.enable(args.compile_cache)
    config = Config(resize=args.resize, batch_size=args.batch_size, parallel="jit", data_dir=args.data_dir,
                    manual_dir=args.manual_dir, data_arrays=args.data_arrays).validate()

    def phase(name, run):
        start = time.perf_counter()
        result = jax.block_until_ready(run())
        seconds[name] = time.perf_counter() - start
        return result

    datasets = phase("data", lambda: dataset.load_datasets(config))
    strategy = parallel.create_strategy(config, trainer.loop_steps(config))
    state = phase("init", lambda: strategy.put_state(steps.create_train_state(config)))
    batch = next(input_pipeline.eval_batches(datasets["train"], config.batch_size))
    phase("compile", lambda: strategy.compile(state, batch))
    phase("first_step", lambda: strategy.train_step(state, strategy.zero_carry(), batch))
    return {"seconds": seconds, "tensorflow_imported": "tensorflow" in sys.modules}


def run_command(args, compile_cache: str, workdir: str) -> float:
    """Wall seconds of the short training command in a new process."""
    command = [sys.executable, os.path.join(REPO_ROOT, "train.py"), "--resize", str(args.resize), "--num_epochs", "1",
               "--train_examples", "8", "--eval_examples", "8", "--batch_size", str(args.batch_size),
               "--workdir", workdir, "--compile_cache", compile_cache, *data_flags(args)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
    return seconds


def data_flags(args) -> list[str]:
    return [f"--{name}={getattr(args, name)}" for name in ("data_dir", "manual_dir", "data_arrays") if getattr(args, name)]


def run_phases(args, compile_cache: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--phases_in_this_process", "--resize", str(args.resize),
               "--batch_size", str(args.batch_size), "--compile_cache", compile_cache, *data_flags(args)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resize", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--data_dir", default=None, help="tensorflow-datasets data directory")
    parser.add_argument("--manual_dir", default=None, help="folder of the four Fashion-MNIST .gz files")
    parser.add_argument("--data_arrays", default=None, help="an .npz from `python -m nin_jax.export_arrays`")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; medians are printed")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--compile_cache", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phases_in_this_process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phases_in_this_process:
        print(json.dumps(time_phases(args)))
        return

    with tempfile.TemporaryDirectory(prefix="nin_jax_startup_") as scratch:
        commands = {"cold": [], "warm": []}
        for repeat in range(args.repeats):
            cache = os.path.join(scratch, f"cache{repeat}")
            for kind in commands:
                commands[kind].append(run_command(args, cache, os.path.join(scratch, f"run{repeat}_{kind}")))
        phase_runs = [run_phases(args, os.path.join(scratch, "cache0")) for _ in range(args.repeats)]

    phases = {name: [run["seconds"][name] for run in phase_runs] for name in PHASES}
    medians = {name: statistics.median(values) for name, values in {**phases, **commands}.items()}
    print(f"start-up at {args.resize} px, batch {args.batch_size}: medians of {args.repeats} fresh processes")
    for name in PHASES:
        print(f"  {name:<12} {medians[name]:6.2f} s   (warm compilation cache)")
    print(f"  {'TensorFlow':<12} {'imported' if any(run['tensorflow_imported'] for run in phase_runs) else 'not imported'}")
    for kind in commands:
        print(f"  train.py     {medians[kind]:6.2f} s   ({kind}: {'empty' if kind == 'cold' else 'filled'} compilation cache)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"resize": args.resize, "batch_size": args.batch_size, "phase_seconds": phases,
                       "command_seconds": commands, "medians": medians,
                       "tensorflow_imported": [run["tensorflow_imported"] for run in phase_runs]}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
