"""benchmarks/accelerator.sh and its pieces, on the CPU standing in for an accelerator: the budget
that the run ends within, the refusal of a JAX that would not compute on the platform asked for,
the one process of the step figures (accelerator_steps.py), a recipe's phases (recipe_phases.py)
and the summary's verdicts (accelerator_summary.py)."""

import json
import sys
import tarfile
import time
import types

import pytest

from nin_jax.runtime import platforms

from conftest import load_benchmark, random_arrays, run_script

# The script at 67 px on 32 examples, batch 8, steps timed in 2 windows of 2: what a GPU machine
# runs at 224 px on all the data, 5 windows of 100. The accelerator tests skip, as on a CPU machine.
STAND_IN = dict(RESIZE="67", BATCH_SIZES="8", EPOCHS="2", TRAIN_EXAMPLES="32", WINDOW_STEPS="2", WINDOWS="2",
                WARMUP="1", PROFILE_STEPS="2", MIN_GROUP_S="5", JAX_PLATFORMS="cpu", PYTHON=sys.executable,
                NIN_JAX_ACCELERATOR_STAND_IN="")
PARTS = ["recipe_strong_cold", "recipe_strong_warm", "steps", "recipe_reference", "deterministic", "plan",
         "accelerator tests"]
TARGETS = ["bf16 train images/s at batch 8 >= 2x the best PyTorch step on the same device",
           "bf16 train images/s at batch 8 >= 1.5x the best PyTorch step on the same device",
           "strong recipe, cold: an empty compile cache, a fresh process: test accuracy >= 0.94 in <= 30 s from "
           "process start",
           "strong recipe, warm: the cache that the cold run filled, a new process: test accuracy >= 0.94 in <= 20 s "
           "from process start"]


def verdict_rows(summary_md: str) -> list[list[str]]:
    """The cells of the verdict table that summary.md opens with, after its title and header."""
    lines = summary_md.splitlines()
    assert lines[2] == "| target | measured: median (slowest to fastest window) | against | ratio | verdict |"
    return [line.strip("| ").split(" | ") for line in lines[4:8]]


@pytest.mark.slow
def test_the_script_ends_within_a_budget_too_small_for_its_parts_and_says_what_it_clipped(tmp_path):
    """A budget of 85 s for shares of 1,335 s (LIMIT_SCALE 3): the cold recipe runs; the warm
    one hangs, deaf to SIGTERM, and lasts until its SIGKILL, still within its limit; the parts
    after it are skipped. The summary, its verdict table and the archive are written all the
    same, and the script exits 1."""
    data, out, budget = tmp_path / "arrays.npz", tmp_path / "results", 85
    random_arrays(data, 32, 16)
    python = tmp_path / "python_whose_warm_recipe_hangs"
    python.write_text("#!/bin/bash\nif [[ $* == *recipe_strong_warm* ]]; then trap '' TERM; exec sleep 600; fi\n"
                      f"exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    start = time.monotonic()
    result = run_script("bash", "benchmarks/accelerator.sh", "--platform", "cpu", "--budget_s", str(budget), str(out),
                        env={**STAND_IN, "PYTHON": str(python), "DATA": str(data), "LIMIT_SCALE": "3"},
                        timeout=budget + 60)
    assert time.monotonic() - start <= budget, result.stdout
    assert result.returncode == 1, result.stdout + result.stderr
    parts = [json.loads(line) for line in (out / "parts.jsonl").read_text().splitlines()]
    assert [part["part"] for part in parts] == PARTS
    status = {part["part"]: part["status"] for part in parts}
    assert status["recipe_strong_cold"] == "ok" and status["plan"] == "skipped: no accelerator to plan for"
    assert status["accelerator tests"].startswith("skipped: ") and status["accelerator tests"].endswith(
        " s left of its share")  # the budget's end came before its share
    assert status["recipe_strong_warm"] == "clipped: stopped at its deadline"
    assert status["steps"].startswith("skipped: ") and status["steps"].endswith(" s left of its share")
    assert all(part["seconds"] <= part["limit_s"] for part in parts), parts
    assert json.loads((out / "environment.json").read_text())["backend"] == "cpu"
    phases = json.loads((out / "recipe_strong_cold.phases.json").read_text())
    assert all(phases["phases_s"][phase] > 0 for phase in ("start-up", "compile", "epochs", "evaluations",
                                                           "checkpoints"))
    assert 0 < phases["first_step_s"] < phases["exit_began_s"] < parts[0]["seconds"]
    assert sum(phases["phases_s"].values()) == pytest.approx(phases["exit_began_s"], abs=0.1)
    rows = verdict_rows((out / "summary.md").read_text())
    assert [row[0] for row in rows] == TARGETS
    assert rows[2][1].endswith(" (one run)") and rows[2][4] == "fail"  # random labels: far from 0.94
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipes"]["recipe_strong_cold"]["phases_s"]["exit"] >= 0
    with tarfile.open(tmp_path / "results.tar.gz") as packed:
        assert {"results/summary.md", "results/summary.json", "results/log.txt", "results/parts.jsonl"} <= set(
            packed.getnames())
    assert f"s of a budget of {budget} s; exit status 1" in result.stdout


def test_the_script_refuses_a_jax_platforms_that_names_another_platform_in_one_line(tmp_path):
    data = tmp_path / "arrays.npz"
    random_arrays(data, 8, 8)
    result = run_script("bash", "benchmarks/accelerator.sh", "--platform", "gpu", str(tmp_path / "results"),
                        env={"JAX_PLATFORMS": "cpu", "DATA": str(data), "PYTHON": sys.executable}, timeout=30)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("benchmarks/accelerator.sh: JAX_PLATFORMS=cpu would not compute on the gpu asked for "
                             "(--platform gpu needs JAX_PLATFORMS=cuda or none); nothing was measured\n")
    assert not (tmp_path / "results").exists()


def test_the_script_stops_in_one_line_where_jax_cannot_compute_on_the_platform_asked_for(tmp_path):
    """JAX_PLATFORMS is set to the platform asked for, so a plugin that cannot start stops JAX
    instead of leaving it on the CPU; the script says why in one line and writes nothing."""
    platform, jax_platform = next((platform, jax_platform) for platform, jax_platform in (("gpu", "cuda"), ("tpu", "tpu"))
                                  if not platforms.has_devices(jax_platform))
    data = tmp_path / "arrays.npz"
    random_arrays(data, 8, 8)
    result = run_script("bash", "benchmarks/accelerator.sh", "--platform", platform, str(tmp_path / "results"),
                        env={"JAX_PLATFORMS": "", "DATA": str(data), "PYTHON": sys.executable}, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"benchmarks/accelerator.sh: JAX cannot start JAX_PLATFORMS={jax_platform} (")
    assert result.stderr.endswith("); nothing was measured\n") and result.stderr.count("\n") == 1
    assert not (tmp_path / "results").exists()


def test_the_environment_refuses_a_backend_other_than_the_one_asked_for(tmp_path):
    result = run_script(sys.executable, "benchmarks/accelerator_environment.py", "--backend", "gpu", "--out",
                        str(tmp_path / "environment.json"), env={"JAX_PLATFORMS": "cpu"}, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.endswith("accelerator_environment.py: JAX computes on cpu, not on the gpu asked for\n")
    assert not (tmp_path / "environment.json").exists()


@pytest.mark.parametrize("args, why", [
    ([], ""),
    (["--platform", "cuda", "R"], " (--platform is gpu, tpu or cpu, not cuda)"),
    (["--budget_s", "8m", "R"], " (--budget_s is a whole number of seconds, not 8m)"),
    (["--budget_s"], " (--budget_s needs a value)"),
    (["--budget", "60", "R"], " (no flag --budget)"),
    (["R", "S"], " (one results folder, not R and S)"),
])
def test_a_wrong_flag_of_the_script_is_one_line(args, why):
    result = run_script("bash", "benchmarks/accelerator.sh", *args, timeout=30)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("usage: bash benchmarks/accelerator.sh [--platform gpu|tpu|cpu] [--budget_s SECONDS] "
                             f"RESULTS_FOLDER{why}\n")


def test_the_script_needs_the_data(tmp_path):
    result = run_script("bash", "benchmarks/accelerator.sh", "--platform", "cpu", str(tmp_path / "results"),
                        env={"DATA": str(tmp_path / "missing.npz")}, timeout=30)
    assert result.returncode == 2 and "no data at" in result.stderr and "nin_jax.export_arrays" in result.stderr
    assert not (tmp_path / "results").exists()


def test_the_steps_process_writes_each_group_as_measured_and_skips_what_its_time_does_not_allow(tmp_path):
    """One second for all groups: the first starts (a second is left), the rest are skipped."""
    out = tmp_path / "steps.jsonl"
    result = run_script(sys.executable, "benchmarks/accelerator_steps.py", "--out", str(out), "--resize", "67",
                        "--batch_sizes", "8", "--steps_per_window", "2", "--windows", "3", "--warmup", "1",
                        "--seconds", "1", "--min_group_s", "0", env={"JAX_PLATFORMS": "cpu"}, timeout=300)
    assert result.returncode == 0, result.stderr
    first, *rest = [json.loads(line) for line in out.read_text().splitlines()]
    assert (first["group"], first["status"], first["windows"], first["steps_per_window"]) == ("bfloat16_8", "measured",
                                                                                             3, 2)
    nin_jax = first["contenders"]["nin_jax"]
    assert len(nin_jax["step_seconds"]) == 3 and nin_jax["setup_seconds"] >= nin_jax["compile_seconds"] > 0
    rate = nin_jax["images_per_sec"]
    assert 0 < rate["min"] <= rate["median"] <= rate["max"] and nin_jax["config"]["dtype"] == "bfloat16"
    assert [group["group"] for group in rest] == ["profile", "forms_bfloat16_8", "float32_8", "pmap_bfloat16_8"]
    assert all(group["status"].startswith("skipped: ") and group["status"].endswith(" left of 1, under 0")
               for group in rest)
    assert result.stdout.splitlines()[0].startswith("bfloat16_8 (")


def test_pytorch_steps_take_turns_and_one_that_cannot_be_set_up_leaves_the_others_their_figures(monkeypatch):
    """PyTorch's steps as contenders of a group, without torch: its step and wait stood in for, and
    torch.compile failing as it does without a C compiler."""
    accelerator_steps = load_benchmark("accelerator_steps")
    compare_pytorch = sys.modules["compare_pytorch"]
    calls = []

    def torch_step_fn(resize, batch_size, learning_rate, dtype, device, variant):
        if variant == "compiled":
            raise RuntimeError("InductorError: no working C compiler found\nmore lines")
        return lambda: calls.append(variant)

    monkeypatch.setattr(accelerator_steps, "pytorch_missing", lambda device: "")
    monkeypatch.setattr(compare_pytorch, "torch_step_fn", torch_step_fn)
    monkeypatch.setattr(compare_pytorch, "torch_wait", lambda device: lambda result: None)
    args = types.SimpleNamespace(resize=67, steps_per_window=3, windows=2, warmup=1)
    group = accelerator_steps.Group("bfloat16_8", "bfloat16", 8, forms=(), pytorch=("book", "compiled", "tuned"))
    record = accelerator_steps.measure(group, args, accelerator_steps.Kept())
    assert list(record["contenders"]) == ["pytorch book", "pytorch tuned"]
    assert record["notes"] == ["pytorch compiled not set up: RuntimeError: InductorError: no working C compiler found"]
    assert calls == ["book", "tuned"] * 2 + (["book"] * 3 + ["tuned"] * 3) * 2  # set-up, warm-up, then in turns
    assert all(result["model"] == "pytorch" and len(result["step_seconds"]) == 2
               for result in record["contenders"].values())


def test_the_profile_group_counts_the_steps_it_traced_by_hand(tmp_path):
    """Traced with jax.profiler by hand, as the steps process does: no steps.json, the table counts
    the steps in the trace."""
    accelerator_steps = load_benchmark("accelerator_steps")
    args = types.SimpleNamespace(resize=67, warmup=0, profile_dir=str(tmp_path / "profile"))
    group = accelerator_steps.Group("profile", "bfloat16", 8, profile_steps=3)
    assert accelerator_steps.profile(group, args, accelerator_steps.Kept(), str(tmp_path)) == {
        "traced_steps": 3, "report_steps": 3, "report_steps_from": "the trace's run ids"}
    assert not (tmp_path / "profile" / "steps.json").exists()
    assert json.loads((tmp_path / "profile.json").read_text())["steps"] == 3
    assert (tmp_path / "profile.txt").read_text().startswith("3 traced train steps (by the trace's run ids)")


def write_run(folder, groups, cold_seconds=24.0, warm_status="ok"):
    """The files of an accelerator.sh run, made up: parts, the strong recipe's two runs, the steps."""
    folder.mkdir()
    parts = [{"part": "recipe_strong_cold", "status": "ok", "exit_code": 0, "seconds": cold_seconds, "limit_s": 55},
             {"part": "recipe_strong_warm", "status": warm_status, "exit_code": 124, "seconds": 30.0, "limit_s": 30},
             {"part": "steps", "status": "ok", "exit_code": 0, "seconds": 200.0, "limit_s": 225}]
    (folder / "parts.jsonl").write_text("".join(json.dumps(part) + "\n" for part in parts))
    (folder / "recipe_strong_cold.jsonl").write_text(json.dumps(
        {"test_accuracy": 0.9421, "compile_seconds": 6.0, "examples_per_sec": 30000.0}) + "\n")
    (folder / "recipe_strong_cold.phases.json").write_text(json.dumps(
        {"phases_s": {"start-up": 3.0, "compile": 6.0, "epochs": 14.0}, "first_step_s": 9.0, "exit_began_s": 23.5}))
    (folder / "steps.jsonl").write_text("".join(json.dumps(group) + "\n" for group in groups))


def group(batch_size, rates, notes=()):
    """A measured group of bf16 steps: each contender's images/s as (median, min, max)."""
    contenders = {name: {"model": "nin_jax" if name == "nin_jax" else "pytorch", "setup_seconds": 1.0,
                         "images_per_sec": dict(zip(("median", "min", "max"), rate))} for name, rate in rates.items()}
    return {"group": f"bfloat16_{batch_size}", "dtype": "bfloat16", "batch_size": batch_size, "resize": 224,
            "status": "measured", "seconds": 30.0, "windows": 5, "steps_per_window": 100, "contenders": contenders,
            "notes": list(notes)}


def test_the_summary_opens_with_a_verdict_on_each_target(tmp_path):
    """nin_jax against the best PyTorch step of its group, with the ratio's range from the windows;
    the strong recipe's runs against accuracy and time; each figure it lacks, with the reason."""
    summary_script = load_benchmark("accelerator_summary")
    groups = [group(128, {"nin_jax": (50_000, 49_000, 51_000), "pytorch book": (20_000, 19_000, 21_000),
                          "pytorch compiled": (24_000, 23_500, 24_500)}),
              group(512, {"nin_jax": (54_000, 53_000, 55_000)}, notes=["no PyTorch steps: this torch has no CUDA"])]
    write_run(tmp_path / "run", groups, cold_seconds=24.0, warm_status="clipped: stopped at its deadline")
    assert summary_script.main([str(tmp_path / "run"), "--batch_sizes", "128", "512"]) == 0
    text = (tmp_path / "run" / "summary.md").read_text()
    assert text.startswith("# nin_jax on an unknown device: 2 of 4 targets met\n")
    assert verdict_rows(text) == [
        ["bf16 train images/s at batch 128 >= 2x the best PyTorch step on the same device",
         "50,000 (49,000 to 51,000) images/s", "pytorch compiled: 24,000 (23,500 to 24,500)", "2.08x (2.00 to 2.17)",
         "pass"],
        ["bf16 train images/s at batch 512 >= 1.5x the best PyTorch step on the same device", "", "", "",
         "not measured: no PyTorch steps: this torch has no CUDA"],
        [TARGETS[2], "24.0 s, accuracy 0.9421 (one run)", "30 s, accuracy 0.94", "0.80 of the time",
         "pass"],
        [TARGETS[3], "stopped at its deadline after 30.0 s", "20 s, accuracy 0.94", "over 1.50 of the time", "fail"]]
    cold = json.loads((tmp_path / "run" / "summary.json").read_text())["recipes"]["recipe_strong_cold"]
    assert cold["phases_s"] == {"start-up": 3.0, "compile": 6.0, "epochs": 14.0, "exit": 0.5}
    assert "| strong_cold | ok | 24.0 | 0.9421 | 1 | 30,000, 30,000, 30,000 | 9.0 | 3.0 |  |  | 6.0 | 14.0 |" in text


def test_a_ratio_below_its_target_fails_and_a_group_never_reached_is_not_measured(tmp_path):
    summary_script = load_benchmark("accelerator_summary")
    groups = [group(128, {"nin_jax": (30_000, 29_000, 31_000), "pytorch tuned": (24_000, 23_000, 25_000)})]
    write_run(tmp_path / "run", groups, cold_seconds=31.0)
    summary = summary_script.collect(str(tmp_path / "run"), [128, 512])
    assert [(row["verdict"], row["value"]) for row in summary["verdicts"]] == [
        ("fail", 1.25), ("not measured: the steps part (ok) did not reach it", None), ("fail", 31.0),
        ("not measured: its run wrote no epoch's record", None)]
