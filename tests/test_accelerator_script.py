"""The pieces of benchmarks/accelerator.sh, on the CPU standing in for an accelerator: the refusal
of a JAX that would not compute on the platform asked for (accelerator_environment.py) and the one
process of the step figures (accelerator_steps.py)."""

import json
import sys
import types

from conftest import load_benchmark, run_script


def test_the_environment_refuses_a_backend_other_than_the_one_asked_for(tmp_path):
    result = run_script(sys.executable, "benchmarks/accelerator_environment.py", "--backend", "gpu", "--out",
                        str(tmp_path / "environment.json"), env={"JAX_PLATFORMS": "cpu"}, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.endswith("accelerator_environment.py: JAX computes on cpu, not on the gpu asked for\n")
    assert not (tmp_path / "environment.json").exists()


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
