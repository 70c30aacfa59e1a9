"""The benchmark scripts run and report what they promise (on small sizes; the numbers are in docs/performance.md)."""

import importlib.util
import json
import os
import sys
import tarfile

import numpy as np
import pytest

from conftest import load_benchmark, random_arrays, run_script


def test_step_throughput_measures_every_batch_size_and_kernel_choice(tmp_path):
    """Both dtypes: the accelerator script's test below."""
    out = tmp_path / "steps.json"
    result = run_script(sys.executable, "benchmarks/step_throughput.py", "--resize", "67", "--batch_size", "4", "8",
                        "--dtype", "bfloat16", "--cpu_kernels", "tuned", "default", "--max_pool",
                        "reduce_window", "--conv1x1", "conv", "--steps", "1", "--repeats", "2", "--warmup", "1",
                        "--out", str(out))
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())["results"]
    assert [(r["config"]["dtype"], r["config"]["batch_size"], r["config"]["cpu_kernels"]) for r in results] == [
        ("bfloat16", batch, kernels) for batch in (4, 8) for kernels in ("tuned", "default")]
    assert {(r["config"]["max_pool"], r["config"]["conv1x1"]) for r in results} == {("reduce_window", "conv")}
    for r in results:
        assert len(r["train_step_seconds"]) == 2 and r["train_images_per_sec"] > 0 and r["compile_seconds"] > 0
        low, high = r["train_images_per_sec_range"]
        assert low <= r["train_images_per_sec"] <= high and r["host_peak_rss_bytes"] > 0
    assert len(result.stdout.strip().splitlines()) == 1 + 4 + 1  # header, 4 rows, "wrote ..."


def test_step_throughput_times_the_plain_flax_nin_beside_nin_jax(tmp_path):
    out = tmp_path / "steps.json"
    result = run_script(sys.executable, "benchmarks/step_throughput.py", "--resize", "67", "--batch_size", "4",
                        "--model", "plain", "--steps", "1", "--repeats", "2", "--warmup", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    (plain,) = json.loads(out.read_text())["results"]
    assert plain["model"] == "plain" and plain["train_images_per_sec"] > 0 and "eval_images_per_sec" not in plain


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


@pytest.mark.slow
def test_accelerator_script_runs_small_on_the_cpu_without_tensorflow_data(tmp_path):
    """benchmarks/accelerator.sh at 67 px on 32 examples, batch 8: what a GPU machine runs at 224 on all
    the data. Every part runs and records itself, the summary holds every figure, the results are
    packed into one file; the PyTorch parts only where torch is installed."""
    data = tmp_path / "arrays.npz"
    random_arrays(data, 32, 16)
    out = tmp_path / "results"
    env = dict(RESIZE="67", BATCH_SIZES="8", EPOCHS="2", TRAIN_EXAMPLES="32", DATA=str(data), PYTHON=sys.executable,
               STEP_FLAGS="--steps 1 --repeats 2 --warmup 1", TORCH_FLAGS="--steps 1 --rounds 2 --warmup 1",
               PROFILE_STEPS="2", BUDGET_S="3000", LIMIT_SCALE="10",
               NIN_JAX_ACCELERATOR_STAND_IN="")  # as on a CPU machine: CI's stand-in would run the accelerator tests
    result = run_script("bash", "benchmarks/accelerator.sh", str(out), env=env, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    parts = {p["part"]: p for p in map(json.loads, (out / "parts.jsonl").read_text().splitlines())}
    torch = importlib.util.find_spec("torch") is not None  # optional: the test extra does not install it
    steps = [f"step {model}_{dtype}_8" for dtype in ("bfloat16", "float32") for model in ("nin_jax", "plain")]
    levers = [f"step lever_{lever}" for lever in ("slices_conv", "reduce_window_conv", "indexed_dot", "relu_then_pool")]
    pytorch_parts = ["pytorch_float32_8", "pytorch_bfloat16_8"] if torch else ["pytorch"]
    assert list(parts) == ["environment", "recipe_reference", "recipe_strong", "recipe_strong_again", *steps, "plan",
                           "profile", *levers, *pytorch_parts, "pmap step", "step deterministic_bfloat16_8",
                           "accelerator tests"]
    skipped = {"plan": "skipped: no accelerator to plan for"}
    assert {name: p["status"] for name, p in parts.items() if p["status"] != "ok"} == (
        skipped if torch else {**skipped, "pytorch": "skipped: torch is not installed"})
    environment = json.loads((out / "environment.json").read_text())
    assert environment["backend"] == "cpu" and environment["versions"]["jax"] and "accelerator.sh" in environment["command"]
    log = (out / "log.txt").read_text()
    assert "3 skipped" in log and "no accelerator" in log  # the accelerator tests, on a CPU
    summary = json.loads((out / "summary.json").read_text())
    for name in ("recipe_reference", "recipe_strong", "recipe_strong_again"):
        recipe = summary["recipes"][name]
        assert recipe["status"] == "ok" and recipe["epochs"] == 2 and len(recipe["epoch_images_per_sec"]) == 2
        assert 0 <= recipe["test_accuracy"] <= 1 and recipe["seconds"] > 0
        records = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert records[-1]["train_examples"] == 32 and records[-1]["test_examples"] == 16
    assert summary["recipes"]["recipe_strong_again"]["compile_seconds"] < summary["recipes"]["recipe_strong"]["compile_seconds"]
    assert set(summary["steps"]) == {"nin_jax_bfloat16_8", "nin_jax_float32_8", "plain_bfloat16_8", "plain_float32_8",
                                     "lever_slices_conv", "lever_reduce_window_conv", "lever_indexed_dot",
                                     "lever_relu_then_pool",
                                     "pmap_bfloat16_8", "deterministic_bfloat16_8"}
    assert all(step["train_images_per_sec"] > 0 for step in summary["steps"].values())
    assert summary["steps"]["pmap_bfloat16_8"]["parallel"] == "pmap"
    assert (summary["steps"]["lever_indexed_dot"]["max_pool"], summary["steps"]["lever_indexed_dot"]["conv1x1"]) == (
        "indexed", "dot")
    assert summary["profile"]["steps"] == 2 and summary["profile"]["table_ms"]["block 1"]["forward"] > 0
    assert not torch or set(summary["pytorch"]["pytorch_float32_8"]["ratios"]) == {"pytorch book", "pytorch tuned"}
    text = (out / "summary.md").read_text()
    assert text.startswith("# nin_jax on cpu") and "| float32, 8 |" in text and "## Where the bf16 step's time goes" in text
    with tarfile.open(tmp_path / "results.tar.gz") as packed:
        assert {"results/summary.md", "results/summary.json", "results/log.txt"} <= set(packed.getnames())


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
    assert {"metrics.jsonl", "config.json", "curves.png", "checkpoints"} == {f for f in files if "tfevents" not in f}
    assert len(files) == 5  # and one TensorBoard event file, written without TensorFlow; run.lock goes as the run ends


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


def test_plan_check_sets_the_measured_step_beside_its_plan(tmp_path):
    """benchmarks/plan_check.py on the files that accelerator.sh writes: one configuration per step
    file, each with the device peak of its own process; a plan without a roofline (no published
    figures) is checked for memory alone."""
    plan_check = load_benchmark("plan_check")
    config = lambda dtype, batch=128: {"dtype": dtype, "batch_size": batch, "resize": 224}  # noqa: E731
    (tmp_path / "steps").mkdir()
    for name, result in (
            ("nin_jax_float32_128", {"config": config("float32"), "train_images_per_sec": 20_000.0,
                                     "device_peak_bytes": 3 * 2**30}),
            ("nin_jax_float32_512", {"config": config("float32", 512), "train_images_per_sec": 1.0}),
            ("plain_bfloat16_128", {"model": "plain", "config": config("bfloat16"), "train_images_per_sec": 1.0}),
            ("nin_jax_bfloat16_128", {"config": config("bfloat16"), "train_images_per_sec": 35_000.0,
                                      "device_peak_bytes": 2**30})):
        result = {"model": "nin_jax", "parallel": "jit", **result}
        (tmp_path / "steps" / f"{name}.json").write_text(json.dumps({"results": [result]}))
    for dtype, roofline, total in (("float32", 100_000.0, 2 * 2**30), ("bfloat16", None, 2**30)):
        planned = {"compiled": True, "batch_size": 128, "resize": 224, "roofline": {"images_per_sec": roofline},
                   "memory": {"total": total}}
        (tmp_path / f"plan_{dtype}.json").write_text(json.dumps([planned]))
    rows = plan_check.compare(*plan_check.read_results(str(tmp_path)))
    assert [(row["dtype"], row["measured_over_roofline"]) for row in rows] == [("float32", 0.2), ("bfloat16", None)]
    assert [row["measured_over_planned_bytes"] for row in rows] == [1.5, 1.0]
    assert plan_check.format_row(rows[0]) == (
        "float32 at batch 128, 224 px: 20,000 train images/s measured against a roofline of 100,000 (20.0% of it); "
        "peak device memory 3,072 MiB against 2,048 MiB planned (1.50x)")
    assert plan_check.format_row(rows[1]) == ("bfloat16 at batch 128, 224 px: 35,000 train images/s; peak device "
                                              "memory 1,024 MiB against 1,024 MiB planned (1.00x)")
