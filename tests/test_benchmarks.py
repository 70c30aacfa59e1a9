"""The benchmark scripts run and report what they promise (on small sizes; the numbers are in the README)."""

import json
import os
import subprocess
import sys

import numpy as np

from nin_jax import input_pipeline

from conftest import REPO_ROOT


def run_script(*args, env=None, timeout=600):
    return subprocess.run(list(args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env or {})})


def test_step_throughput_measures_every_batch_size_and_dtype(tmp_path):
    out = tmp_path / "steps.json"
    result = run_script(sys.executable, "benchmarks/step_throughput.py", "--resize", "67", "--batch_size", "4", "8",
                        "--dtype", "float32", "bfloat16", "--steps", "1", "--repeats", "2", "--warmup", "1",
                        "--out", str(out))
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())["results"]
    assert [(r["config"]["batch_size"], r["config"]["dtype"]) for r in results] == [
        (4, "float32"), (8, "float32"), (4, "bfloat16"), (8, "bfloat16")]
    for r in results:
        assert len(r["train_step_seconds"]) == 2 and r["train_images_per_sec"] > 0 and r["compile_seconds"] > 0
        assert r["host_peak_rss_bytes"] > 0
    assert len(result.stdout.strip().splitlines()) == 1 + 4 + 1  # header, 4 rows, "wrote ..."


def test_gpu_script_runs_small_on_the_cpu_without_tensorflow_data(tmp_path):
    """benchmarks/gpu.sh, at 67 px on 32 examples: what a lent GPU would run at 224 on all the data."""
    rng = np.random.default_rng(0)
    split = lambda n: input_pipeline.Split(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),  # noqa: E731
                                           rng.integers(0, 10, n, dtype=np.int32))
    data = tmp_path / "arrays.npz"
    input_pipeline.save_arrays({"train": split(32), "test": split(16)}, str(data))
    out = tmp_path / "out"
    env = dict(OUT=str(out), RESIZE="67", BATCH_SIZES="8", EPOCHS="2", DATA=str(data), PYTHON=sys.executable)
    result = run_script("bash", "benchmarks/gpu.sh", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(os.listdir(out)) == ["log.txt", "reference.jsonl", "steps.json", "strong.jsonl"]
    assert len(json.loads((out / "steps.json").read_text())["results"]) == 2  # fp32 and bf16 at batch 8
    for recipe in ("reference", "strong"):
        records = [json.loads(line) for line in (out / f"{recipe}.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1, 2]
        assert records[-1]["train_examples"] == 32 and records[-1]["test_examples"] == 16
        assert f"{recipe} recipe: 2 epochs at 67 px, evaluation included, in " in (out / "log.txt").read_text()
