"""The benchmark scripts run and report what they promise (on small sizes; the numbers are in docs/performance.md)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nin_jax import data_arrays, input_pipeline

from conftest import REPO_ROOT


def run_script(*args, env=None, timeout=600):
    return subprocess.run(list(args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env or {})})


def test_step_throughput_measures_every_batch_size_dtype_and_kernel_choice(tmp_path):
    out = tmp_path / "steps.json"
    result = run_script(sys.executable, "benchmarks/step_throughput.py", "--resize", "67", "--batch_size", "4", "8",
                        "--dtype", "float32", "bfloat16", "--cpu_kernels", "tuned", "default", "--max_pool",
                        "reduce_window", "--conv1x1", "conv", "--steps", "1", "--repeats", "2", "--warmup", "1",
                        "--out", str(out))
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())["results"]
    assert [(r["config"]["dtype"], r["config"]["batch_size"], r["config"]["cpu_kernels"]) for r in results] == [
        (dtype, batch, kernels) for dtype in ("float32", "bfloat16") for batch in (4, 8) for kernels in ("tuned", "default")]
    assert {(r["config"]["max_pool"], r["config"]["conv1x1"]) for r in results} == {("reduce_window", "conv")}
    for r in results:
        assert len(r["train_step_seconds"]) == 2 and r["train_images_per_sec"] > 0 and r["compile_seconds"] > 0
        assert r["host_peak_rss_bytes"] > 0
    assert len(result.stdout.strip().splitlines()) == 1 + 8 + 1  # header, 8 rows, "wrote ..."


def random_arrays(path, train_examples: int, test_examples: int) -> None:
    rng = np.random.default_rng(0)
    split = lambda n: input_pipeline.Split(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),  # noqa: E731
                                           rng.integers(0, 10, n, dtype=np.int32))
    data_arrays.save({"train": split(train_examples), "test": split(test_examples)}, str(path))


def test_epoch_overhead_compares_the_real_loop_with_the_step_alone(tmp_path):
    data, out = tmp_path / "arrays.npz", tmp_path / "overhead.json"
    random_arrays(data, 40, 8)
    result = run_script(sys.executable, "benchmarks/epoch_overhead.py", "--resize", "67", "--batch_size", "8",
                        "--train_examples", "40", "--data_arrays", str(data), "--repeats", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["num_steps"] == 5 and len(report["step_seconds_before"]) == len(report["step_seconds_after"]) == 2
    step = np.median(report["step_seconds_before"] + report["step_seconds_after"])
    assert report["overhead"] == pytest.approx(report["epoch_seconds"] / (5 * step) - 1)
    assert "epoch of 40 examples at 67 px (5 steps of 8)" in result.stdout and "overhead" in result.stdout


def test_accelerator_script_runs_small_on_the_cpu_without_tensorflow_data(tmp_path):
    """benchmarks/accelerator.sh at 67 px on 32 examples, in fp32 (and the strong recipe in bf16): what a GPU machine runs at 224
    on all the data. Every part runs and records itself; the PyTorch step only where torch is installed."""
    data = tmp_path / "arrays.npz"
    random_arrays(data, 32, 16)
    out = tmp_path / "results"
    env = dict(RESIZE="67", BATCH_SIZES="8", DTYPES="float32", EPOCHS="2", DATA=str(data), PYTHON=sys.executable,
               STEP_FLAGS="--steps 1 --repeats 2 --warmup 1", LOOP_BATCH_SIZE="8", BUDGET_S="3000", LIMIT_SCALE="10")
    result = run_script("bash", "benchmarks/accelerator.sh", str(out), env=env, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    parts = {p["part"]: p for p in map(json.loads, (out / "parts.jsonl").read_text().splitlines())}
    torch = importlib.util.find_spec("torch") is not None  # optional: the test extra does not install it
    pytorch_part = "pytorch step float32" if torch else "pytorch step"
    assert list(parts) == ["environment", "accelerator tests", "loop ceiling", "step grid", "plan", "pmap step",
                           "deterministic step", "levers", pytorch_part, "reference recipe", "strong recipe"]
    skipped = {"plan": "skipped: no accelerator to plan for"}
    assert {name: p["status"] for name, p in parts.items() if p["status"] != "ok"} == (
        skipped if torch else {**skipped, "pytorch step": "skipped: torch is not installed"})
    assert json.loads((out / "environment.json").read_text())["backend"] == "cpu"
    log = (out / "log.txt").read_text()
    assert "3 skipped" in log and "no accelerator" in log  # the accelerator tests, on a CPU
    assert len(json.loads((out / "steps.json").read_text())["results"]) == 1
    assert json.loads((out / "pmap.json").read_text())["results"][0]["parallel"] == "pmap"
    assert len(json.loads((out / "deterministic.json").read_text())["results"]) == 1
    levers = [(r["config"]["max_pool"], r["config"]["conv1x1"])
              for r in json.loads((out / "levers.json").read_text())["results"]]
    assert levers == [("slices", "dot"), ("slices", "conv"), ("reduce_window", "dot"), ("reduce_window", "conv")]
    assert not torch or json.loads((out / "pytorch_float32.json").read_text())["ratio"] > 0
    for recipe, dtype in (("reference", "float32"), ("strong", "bfloat16")):
        records = [json.loads(line) for line in (out / f"{recipe}.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1, 2]
        assert records[-1]["train_examples"] == 32 and records[-1]["test_examples"] == 16
        assert f"{recipe} recipe: 2 epochs at 67 px in {dtype}, evaluation included, in " in log


def test_accelerator_script_needs_a_results_folder_and_the_data(tmp_path):
    result = run_script("bash", "benchmarks/accelerator.sh")
    assert result.returncode == 2 and result.stderr == "usage: bash benchmarks/accelerator.sh RESULTS_FOLDER\n"
    result = run_script("bash", "benchmarks/accelerator.sh", str(tmp_path / "results"),
                        env={"DATA": str(tmp_path / "missing.npz")})
    assert result.returncode == 2 and "no data at" in result.stderr and "nin_jax.export_arrays" in result.stderr
    assert not (tmp_path / "results").exists()


def test_conv_levers_checks_every_variant_against_xla_and_times_it(tmp_path):
    out = tmp_path / "levers.json"
    result = run_script(sys.executable, "benchmarks/conv_levers.py", "--batch_size", "1", "--repeats", "1",
                        "--layers", "stem", "conv3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    timings = json.loads(out.read_text())["ms"]
    expected = {"stem/xla", "stem/im2col", "stem/space_to_depth", "stem/im2col_dW", "conv3/xla", "conv3/im2col"}
    assert expected <= set(timings)
    assert set(timings["conv3/xla"]) == {"fwd", "dW", "dx"} and set(timings["stem/xla"]) == {"fwd", "dW"}


def test_pool_levers_checks_pooling_against_nn_max_pool_and_times_both(tmp_path):
    out = tmp_path / "pools.json"
    result = run_script(sys.executable, "benchmarks/pool_levers.py", "--batch_size", "1", "--repeats", "1",
                        "--cpu_kernels", "default", "--out", str(out))
    assert result.returncode == 0, result.stderr
    timings = json.loads(out.read_text())["ms"]
    assert {f"{pool}/{variant}" for pool in ("pool1", "pool2", "pool3") for variant in ("nn.max_pool", "pooling")} <= set(timings)
    assert all(set(timings[f"pool2/{variant}"]) == {"fwd", "fwd+dx"} for variant in ("nn.max_pool", "pooling"))


# A None in sys.modules is how Python marks a module as absent: importing it raises
# ModuleNotFoundError and importlib.util.find_spec returns None, as where it is not installed.
BLOCK_TENSORFLOW = """
import runpy, sys

sys.modules.update(tensorflow=None, tensorflow_datasets=None)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_training_from_data_arrays_needs_neither_tensorflow_nor_tfds(tmp_path):
    """What a GPU machine without TensorFlow runs: train.py --data_arrays with a workdir."""
    data, workdir = tmp_path / "arrays.npz", tmp_path / "run"
    random_arrays(data, 16, 8)
    result = run_script(sys.executable, "-c", BLOCK_TENSORFLOW, "train.py", "--data_arrays", str(data), "--resize", "67",
                        "--batch_size", "8", "--num_epochs", "1", "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr
    assert "epoch 1/1: loss" in result.stdout
    files = set(os.listdir(workdir))
    assert {"metrics.jsonl", "config.json", "curves.png", "checkpoints", "run.lock"} == {
        f for f in files if "tfevents" not in f}
    assert len(files) == 6  # and one TensorBoard event file, written without TensorFlow


def test_loop_ceiling_fits_fixed_and_per_step_seconds_from_short_and_long_epochs(tmp_path):
    out = tmp_path / "ceiling.json"
    result = run_script(sys.executable, "benchmarks/loop_ceiling.py", "--batch_size", "8", "--short_steps", "4",
                        "--long_steps", "40", "--num_epochs", "3", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    fastest = {int(steps): seconds for steps, seconds in report["fastest_epoch_seconds"].items()}
    assert set(fastest) == {4, 40}
    assert report["host_seconds_per_step"] == pytest.approx((fastest[40] - fastest[4]) / 36)
    assert report["fixed_seconds_per_epoch"] == pytest.approx(fastest[4] - 4 * report["host_seconds_per_step"])
    assert report["images_per_sec"] == pytest.approx(8 / report["host_seconds_per_step"])
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("epochs of 4 steps: fastest ") and lines[1].startswith("epochs of 40 steps: fastest ")
    assert f"host work per step: {report['host_seconds_per_step'] * 1e6:.1f} us" in lines
    assert lines[-1] == f"loop ceiling at batch 8: {report['images_per_sec']:.0f} images/s"


def test_stop_vote_cost_times_the_step_with_and_without_the_vote(tmp_path):
    out = tmp_path / "vote.json"
    result = run_script(sys.executable, "benchmarks/stop_vote_cost.py", "--batch_size", "8", "--steps", "3",
                        "--rounds", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["step_us"]) == {"vote as input", "vote constant"} and report["read_us"] > 0
    assert all(len(seconds) == 2 for seconds in report["step_seconds"].values())
    assert result.stdout.strip().splitlines()[-2].startswith("the vote costs ")  # before `wrote ...`


def test_startup_times_every_phase_and_the_command_cold_and_warm(tmp_path):
    data, out = tmp_path / "arrays.npz", tmp_path / "startup.json"
    random_arrays(data, 16, 8)
    result = run_script(sys.executable, "benchmarks/startup.py", "--resize", "67", "--data_arrays", str(data),
                        "--repeats", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["phase_seconds"]) == {"import", "data", "init", "compile", "first_step"}
    assert set(report["command_seconds"]) == {"cold", "warm"}
    assert all(len(seconds) == 1 and seconds[0] > 0 for seconds in [*report["phase_seconds"].values(),
                                                                     *report["command_seconds"].values()])
    assert report["tensorflow_imported"] == [False]
    assert "train.py" in result.stdout and "(warm: filled compilation cache)" in result.stdout


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_check_sets_the_measured_step_beside_its_plan(tmp_path):
    """benchmarks/plan_check.py on the files that accelerator.sh writes: the grid's first result
    (whose peak memory is its own) and a later one of the other dtype."""
    plan_check = load_benchmark("plan_check")
    config = lambda dtype: {"dtype": dtype, "batch_size": 128, "resize": 224}  # noqa: E731
    steps = {"results": [{"config": config("float32"), "train_images_per_sec": 20_000.0, "device_peak_bytes": 3 * 2**30},
                         {"config": {**config("float32"), "batch_size": 256}, "train_images_per_sec": 1.0},
                         {"config": config("bfloat16"), "train_images_per_sec": 35_000.0, "device_peak_bytes": 9 * 2**30}]}
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    for dtype, roofline, total in (("float32", 100_000.0, 2 * 2**30), ("bfloat16", 70_000.0, 2**30)):
        planned = {"compiled": True, "batch_size": 128, "resize": 224, "roofline": {"images_per_sec": roofline},
                   "memory": {"total": total}}
        (tmp_path / f"plan_{dtype}.json").write_text(json.dumps([planned]))
    rows = plan_check.compare(steps, {dtype: json.loads((tmp_path / f"plan_{dtype}.json").read_text())[0]
                                      for dtype in ("float32", "bfloat16")})
    assert [(row["dtype"], row["measured_over_roofline"]) for row in rows] == [("float32", 0.2), ("bfloat16", 0.5)]
    assert rows[0]["measured_over_planned_bytes"] == 1.5 and "measured_peak_bytes" not in rows[1]
    assert plan_check.format_row(rows[0]) == (
        "float32 at batch 128, 224 px: 20,000 train images/s measured against a roofline of 100,000 (20.0% of it); "
        "peak device memory 3,072 MiB against 2,048 MiB planned (1.50x)")
