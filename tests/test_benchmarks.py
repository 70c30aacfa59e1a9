"""The benchmark scripts run and report what they promise (on small sizes; the numbers are in docs/performance.md)."""

import json
import os
import sys

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
    """benchmarks/plan_check.py on the files that accelerator.sh writes: nin_jax's steps in the groups
    of steps.jsonl, the first of each dtype and batch compared, with its device peak where it was its
    own; a plan without a roofline (no published figures) is checked for memory alone."""
    plan_check = load_benchmark("plan_check")

    def step(dtype, median, batch=128, peak=None, model="nin_jax"):
        return {"model": model, "parallel": "jit", "config": {"dtype": dtype, "batch_size": batch, "resize": 224},
                "images_per_sec": {"median": median, "min": median, "max": median}, "device_peak_bytes": peak}

    groups = [{"group": "bfloat16_128", "contenders": {"nin_jax": step("bfloat16", 35_000.0, peak=2**30)}},
              {"group": "profile", "status": "measured"},
              {"group": "float32_128", "contenders": {"nin_jax": step("float32", 20_000.0, peak=None),
                                                      "plain": step("float32", 1.0, model="plain")}},
              {"group": "float32_512", "contenders": {"nin_jax": step("float32", 1.0, batch=512, peak=7 * 2**30)}}]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(group) + "\n" for group in groups))
    for dtype, roofline, total in (("float32", 100_000.0, 2 * 2**30), ("bfloat16", None, 2**30)):
        planned = {"compiled": True, "batch_size": 128, "resize": 224, "roofline": {"images_per_sec": roofline},
                   "memory": {"total": total}}
        (tmp_path / f"plan_{dtype}.json").write_text(json.dumps([planned]))
    rows = plan_check.compare(*plan_check.read_results(str(tmp_path)))
    assert [(row["dtype"], row["measured_over_roofline"]) for row in rows] == [("float32", 0.2), ("bfloat16", None)]
    assert [row.get("measured_over_planned_bytes") for row in rows] == [None, 1.0]  # fp32's peak was not its own
    assert plan_check.format_row(rows[0]) == (
        "float32 at batch 128, 224 px: 20,000 train images/s measured against a roofline of 100,000 (20.0% of it)")
    assert plan_check.format_row(rows[1]) == ("bfloat16 at batch 128, 224 px: 35,000 train images/s; peak device "
                                              "memory 1,024 MiB against 1,024 MiB planned (1.00x)")


def test_the_exercises_script_trains_times_and_tables_each_variant_of_a_question(tmp_path, arrays):
    """benchmarks/exercises.py on one question, one seed and 16 examples, in this process (the book's
    recipe at 67 px, whose steps the suite has compiled): both variants trained in workdirs of their
    own, timed side by side, and the question's table written with the figures of exercises.json."""
    exercises = load_benchmark("exercises")
    out = tmp_path / "exercises"
    assert exercises.main(["--questions", "max_head", "--seeds", "0", "--recipe", "reference", "--resize", "67",
                           "--num_epochs", "1", "--batch_size", "8", "--train_examples", "16", "--eval_examples", "8",
                           "--data_arrays", str(arrays), "--timing_steps", "1", "--timing_turns", "1",
                           "--out", str(out)]) == 0
    report = json.loads((out / "exercises.json").read_text())
    variants = report["questions"]["max_head"]
    assert list(variants) == ["book", "head=max"] and "resources" not in report
    assert sorted(os.listdir(out / "runs")) == ["book_seed0", "head_max_seed0"]
    for figures in variants.values():
        assert figures["parameters"] == 1_992_166
        assert figures["step_ms"] > 0 and list(figures["best_epoch"].values()) == [1]
    table = (out / "exercises.md").read_text()
    assert "at 67x67 px, the reference recipe, 1 epoch of 16 training examples in batches of 8, tested on 8" in table
    accuracy = variants["head=max"]["test_accuracy"]["0"]
    assert f"| head=max | 1,992,166 | {accuracy:.3f} | {accuracy:.3f} | " in table


def test_the_exercises_resource_table_reads_the_plans():
    exercises = load_benchmark("exercises")
    planned = lambda batch: {"compiled": True, "flops_per_image": 4.6e9, "eval_flops_per_image": 1.5e9,  # noqa: E731
                             "memory": {"total": batch * 2**20, "eval_total": batch * 2**19}}
    plans = {"local": {1: planned(1), 128: planned(128)}, "h200": {1: {"error": "no CUDA plugin"}, 128: planned(128)}}
    rows = exercises.resources_table(plans, 1_992_166)
    assert rows[0] == "|  | this CPU | NVIDIA H200 |"
    assert "| parameters | 1,992,166 | not planned: no CUDA plugin |" in rows
    assert "| GFLOP per image, inference (forward) | 1.50 | not planned: no CUDA plugin |" in rows
    assert "| memory of a training step, batch 128 | 128.0 MiB | 128.0 MiB |" in rows
    assert "| memory of an inference step, batch 128 | 64.0 MiB | 64.0 MiB |" in rows
