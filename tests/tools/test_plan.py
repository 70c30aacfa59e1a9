"""`python -m nin_jax.plan`: the real train and eval steps compiled for an H100 and for TPU slices
on this CPU, with what must hold in the compiled programs.

Each plan runs in a process of its own: XLA reads its flags (`--xla_gpu_autotune_level=0`) once,
when its first backend starts, which in this process has happened long before. Without the
compilers (`pip install -e '.[plan]'`) the tests fail rather than skip: CI installs them.
"""

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from unittest import mock

import pytest

from nin_jax.ops import choices
from nin_jax.tools.plan import command, planning, programs, targets
from nin_jax.config import Config

from conftest import CPU_ENV, NEEDS_CUDA_PLUGIN, REPO_ROOT, once_per_test_run

NUM_PARAMS = 1_992_166
SPATIAL_LAYERS = ("block1/conv/", "block2/conv/", "block3/conv/", "block4/conv/")
# TPU steps at 67 px, the size the suite trains at: XLA's TPU compiler takes 15 s for them on a
# 2-core CPU, 21 s at 96 px and over 3 minutes at 224 px (docs/performance.md quotes the plans at 224).
TPU_RESIZE = ("--resize", "67")


@pytest.fixture(scope="session")
def run_plan(tmp_path_factory):
    """The plans that `python -m nin_jax.plan FLAGS --json F` writes: each set of flags planned
    once per test run, by whichever `-n` worker asks first (a GPU plan compiles for 20 to 50 s)."""

    def plans(*flags: str) -> list[dict]:
        key = "plan-" + hashlib.sha256("\0".join(flags).encode()).hexdigest()[:16]
        with once_per_test_run(tmp_path_factory, key) as (folder, to_make):
            out = folder / "plans.json"
            if to_make:
                env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
                result = subprocess.run([sys.executable, "-m", "nin_jax.plan", *flags, "--json", str(out)],
                                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
                assert result.returncode == 0, result.stdout + result.stderr[-3000:]
            return json.loads(out.read_text())

    return plans


# The plan most tests read: the book's recipe in bfloat16, with its largest batch searched too.
DEFAULT_H100 = ("--target", "h100", "--recipe", "reference", "--dtype", "bfloat16")


def h100(run_plan, *flags: str) -> dict:
    """The plan for one H100, of the reference recipe unless FLAGS name one: equal plans, one compile
    (DEFAULT_H100's steps come from the plan that also finds its largest batch)."""
    if "--recipe" not in flags:
        flags = ("--recipe", "reference", *flags)
    flags = ("--target", "h100", *flags)
    same_as_default = dict(zip(flags[::2], flags[1::2])) == dict(zip(DEFAULT_H100[::2], DEFAULT_H100[1::2]))
    (result,) = run_plan(*DEFAULT_H100) if same_as_default else run_plan("--no-largest_batch", *flags)
    return result


def spatial_cudnn_calls(result: dict) -> dict[str, list[str]]:
    """For each k x k convolution layer, the cuDNN calls that compute it or its gradients."""
    calls = {layer: [] for layer in SPATIAL_LAYERS}
    for call in result["cudnn_calls"]:
        for layer in SPATIAL_LAYERS:
            if f"/{layer}" in call["op_name"] and call["window"] != "1x1":
                calls[layer].append(call["target"].removeprefix("__cudnn$"))
    return {layer: sorted(targets) for layer, targets in calls.items()}


def check_compiled_and_fits(result: dict) -> None:
    assert result["compiled"], result.get("error")
    assert result["memory"]["fits"] and result["memory"]["total"] > 0
    assert result["batch_size"] == 128


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["reference", "strong"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_both_steps_compile_for_an_h100_and_fit_at_batch_128(recipe, dtype, run_plan):
    result = h100(run_plan, "--recipe", recipe, "--dtype", dtype)
    check_compiled_and_fits(result)
    assert (result["platform"], result["devices"], result["hosts"]) == ("gpu", 1, 1)
    assert result["kernels"]["cudnn"] >= 11 and not result["collectives"]
    assert result["roofline"]["images_per_sec"] > 0 and 4e9 < result["flops_per_image"] < 5e9


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["reference", "strong"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_spatial_convolution_and_its_gradients_are_cudnn_calls_on_the_gpu(recipe, dtype, run_plan):
    """Forward, weight gradient and (past the stem, whose input is the image) input gradient of
    each k x k layer, and no convolution left for XLA's own GPU choices."""
    result = h100(run_plan, "--recipe", recipe, "--dtype", dtype)
    calls = spatial_cudnn_calls(result)
    for layer, kinds in calls.items():
        forward = [kind for kind in kinds if kind.startswith("convForward") or "Bias" in kind]
        assert len(forward) == 1 and kinds.count("convBackwardFilter") == 1, (layer, kinds)
        assert kinds.count("convBackwardInput") == (0 if layer == "block1/conv/" else 1), (layer, kinds)
    assert result["opcodes"].get("convolution", 0) == 0


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["reference", "strong"])
def test_bfloat16_leaves_no_convolution_or_matrix_product_in_float32_on_the_gpu(recipe, run_plan):
    assert h100(run_plan, "--recipe", recipe, "--dtype", "bfloat16")["f32_compute"] == []


@pytest.mark.slow
def test_the_largest_batch_is_compiled_and_fits_on_the_gpu(run_plan):
    (result,) = run_plan(*DEFAULT_H100)
    largest = result["largest_batch"]
    assert largest["batch_size"] > 128 and largest["batch_size"] % result["devices"] == 0
    fitted = [check for check in largest["checks"] if check["batch_size"] == largest["batch_size"]]
    assert fitted and fitted[0]["fits"] and fitted[0]["total"] <= result["memory"]["usable"]
    too_large = [check["batch_size"] for check in largest["checks"] if not check["fits"]]
    assert all(size > largest["batch_size"] for size in too_large)


@pytest.mark.slow
def test_levers_compile_on_the_gpu_and_auto_is_the_measured_choice(run_plan):
    auto = h100(run_plan, "--dtype", "bfloat16")
    plain_ops = h100(run_plan, "--dtype", "bfloat16", "--max_pool", "reduce_window")
    lever_ops = h100(run_plan, "--dtype", "bfloat16", "--max_pool", "slices", "--conv1x1", "dot")
    check_compiled_and_fits(lever_ops)
    assert (choices.resolve("max_pool", "auto", "gpu"), choices.resolve("conv1x1", "auto", "gpu")) == (
        "indexed", "conv")
    # nn.max_pool: a reduce-window, whose gradient XLA's GPU compiler writes as a scatter
    assert plain_ops["opcodes"].get("reduce-window", 0) >= 3 and plain_ops["opcodes"].get("scatter", 0) >= 3
    for result in (auto, lever_ops):
        assert result["opcodes"].get("reduce-window", 0) == result["opcodes"].get("scatter", 0) == 0
    assert any(call["window"] == "1x1" for call in auto["cudnn_calls"])  # the 1x1 layers as convolutions
    assert not any(call["window"] == "1x1" for call in lever_ops["cudnn_calls"])
    # the indexed pools' gradients read one byte per pooled element, not the block's output again
    assert auto["roofline"]["bytes_moved_per_device"] < 0.8 * plain_ops["roofline"]["bytes_moved_per_device"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_convolution_has_its_bias_and_relu_fused_in_cudnn_on_the_gpu(dtype, run_plan):
    """Forward, each convolution is one cuDNN conv-bias-activation call, with the ReLU inside,
    but for the last of each block before a pool, whose ReLU runs after the pool. The stem is a
    3x3 convolution over 16 channels (space-to-depth), the class block's on 16 channels."""
    calls = h100(run_plan, "--dtype", dtype)["cudnn_calls"]
    forward = {call["op_name"].split("NiN)/")[-1].rsplit("/", 1)[0]: call for call in calls
               if "transpose(" not in call["op_name"]}
    layers = [f"block{block}/{layer}" for block in range(1, 5) for layer in ("conv", "conv1x1_1", "conv1x1_2")]
    assert sorted(forward) == sorted(layers)
    assert {call["target"] for call in forward.values()} == {"__cudnn$convBiasActivationForward"}
    before_pools = {f"block{block}/conv1x1_2" for block in (1, 2, 3)}
    assert {layer: call["activation"] for layer, call in forward.items()} == {
        layer: "None" if layer in before_pools else "Relu" for layer in layers}
    assert forward["block1/conv"]["window"] == "3x3"
    assert forward["block1/conv"]["operands"][0].endswith("[128,56,56,16]")
    assert forward["block4/conv"]["operands"][1].endswith(",384]") and "16" in forward["block4/conv"]["operands"][1]
    assert forward["block4/conv1x1_1"]["operands"][0].endswith("[128,5,5,16]")


@pytest.mark.slow
def test_the_pmap_steps_compile_for_the_gpu(run_plan):
    result = h100(run_plan, "--dtype", "bfloat16", "--parallel", "pmap")
    check_compiled_and_fits(result)
    assert result["parallel"] == "pmap" and result["kernels"]["cudnn"] >= 11


def check_data_parallel(result: dict) -> None:
    """The batch split over the devices, the parameters whole on each, and the gradients
    all-reduced once, in the compute dtype at the least (under sharding XLA sums bf16 weight
    gradients before their cast to float32): no all-gather of the batch or the parameters."""
    per_device = result["batch_size"] // result["devices"]
    shapes = [shape.split("{")[0] for shape in result["entry_parameters"].values()]
    assert [shape for shape in shapes if shape.startswith("u8[")] == [f"u8[{per_device},28,28,1]"], shapes  # images
    assert "f32[5,5,96,256]" in shapes, shapes  # block 2's kernel, whole
    collectives = result["collectives"]
    assert set(collectives) == {"all-reduce"}, collectives
    least = NUM_PARAMS * (2 if result["dtype"] == "bfloat16" else 4)
    assert least <= collectives["all-reduce"]["bytes"] < 2 * NUM_PARAMS * 4, collectives


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["reference", "strong"])
def test_both_steps_compile_for_a_multi_host_tpu_slice_split_over_its_devices(recipe, run_plan):
    (result,) = run_plan("--target", "tpu-v5e-8", "--no-largest_batch", "--recipe", recipe, "--dtype", "bfloat16",
                         *TPU_RESIZE)
    check_compiled_and_fits(result)
    assert (result["platform"], result["devices"], result["hosts"]) == ("tpu", 8, 2)
    check_data_parallel(result)


@pytest.mark.slow
def test_levers_and_pmap_compile_for_a_single_host_tpu_slice(run_plan):
    """The non-default levers under sharding, and the default steps under pmap, on 4 chips."""
    (lever_ops,) = run_plan("--target", "tpu-v5e-4", "--no-largest_batch", "--dtype", "bfloat16",
                            "--max_pool", "slices", "--conv1x1", "dot", *TPU_RESIZE)
    check_compiled_and_fits(lever_ops)
    check_data_parallel(lever_ops)
    (pmapped,) = run_plan("--target", "tpu-v5e-4", "--no-largest_batch", "--dtype", "bfloat16", "--parallel", "pmap",
                          *TPU_RESIZE)
    check_compiled_and_fits(pmapped)
    assert pmapped["parallel"] == "pmap" and pmapped["hosts"] == 1
    assert (choices.resolve("max_pool", "auto", "tpu"), choices.resolve("conv1x1", "auto", "tpu")) == (
        "reduce_window", "conv")


def test_every_target_is_listed_with_its_published_figures():
    result = subprocess.run([sys.executable, "-m", "nin_jax.plan", "--list"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("h100", "h200", "a100", "l4", "tpu-v4-4", "tpu-v5e-16", "tpu-v5p-16", "tpu-v6e-256"):
        assert name in targets.TARGETS and f"\n{name} " in result.stdout
    gpus = [target for target in targets.TARGETS.values() if target.platform == "gpu"]
    for target in gpus:
        text = targets.gpu_target_config(target)
        assert text.startswith("# NVIDIA") and "device_memory_size" in text  # the figures, and where they come from
    hosts_of = {target.topology for target in targets.TARGETS.values() if target.platform == "tpu"}
    assert {"v5e:2x2", "v5e:4x4", "v6e:16x16"} <= hosts_of


@pytest.mark.parametrize("flags, message", [
    (["--target", "b200"], "argument --target: invalid choice: 'b200'"),
    ([], "--target is required; --list names the targets"),
    (["--target", "h100", "--json", "/no/such/folder/plan.json"], None),
    (["--target", "tpu-v5e-4", "--devices", "2"], "--devices is for listed GPU targets"),
    (["--target", "h100", "--batch_size", "0"], "--batch_size must be from 1 to 65,536, got 0"),
])
def test_wrong_flags_end_with_one_line(flags, message):
    result = subprocess.run([sys.executable, "-m", "nin_jax.plan", *flags], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    if message is None:  # an output that cannot be written is found before anything is compiled
        assert result.returncode == 1 and result.stderr == (
            "python -m nin_jax.plan: error: cannot write /no/such/folder/plan.json: No such file or directory\n")
    else:
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("target, missing, message", [
    ("h100", "jax_plugins.xla_cuda12", "compiling for NVIDIA H100 SXM 80GB needs jax's CUDA plugin: "
                                       "pip install -e '.[plan]'"),
    ("tpu-v5e-4", "libtpu", "compiling for TPU v5e, 4 chips (v5e:2x2) needs libtpu: pip install -e '.[plan]'"),
])
def test_a_missing_compiler_is_named_with_its_install(target, missing, message):
    real_find_spec = importlib.util.find_spec
    with mock.patch.object(importlib.util, "find_spec", lambda name: None if name == missing else real_find_spec(name)):
        with pytest.raises(targets.PlanError, match=re.escape(message)):
            targets.target_devices(targets.TARGETS[target])


def test_a_batch_that_does_not_split_over_the_slice_is_refused_in_one_line():
    result = subprocess.run([sys.executable, "-m", "nin_jax.plan", "--target", "tpu-v5e-16", "--batch_size", "100"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "tpu-v5e-16: --batch_size 100 does not split evenly over 16 devices" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_hlo_facts_count_kernels_collectives_and_bytes():
    """The reading of an optimised module on a small hand-written one."""
    text = """HloModule m

%fused_computation (p: f32[8,4]) -> f32[8,4] {
  %p = f32[8,4]{1,0} parameter(0)
  ROOT %d = f32[8,4]{1,0} dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: bf16[2,8,8,3], w: bf16[3,3,3,4], g: f32[8,4]) -> f32[8,4] {
  %a = bf16[2,8,8,3]{3,2,1,0} parameter(0)
  %w = bf16[3,3,3,4]{3,2,1,0} parameter(1)
  %g = f32[8,4]{1,0} parameter(2)
  %conv = (bf16[2,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%a, %w), window={size=3x3 pad=1_1x1_1}, custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/block1/conv/conv_general_dilated"}
  %gte = bf16[2,8,8,4]{3,2,1,0} get-tuple-element(%conv), index=0
  %ar = f32[8,4]{1,0} all-reduce-start(%g), replica_groups={}
  %ard = f32[8,4]{1,0} all-reduce-done(%ar)
  %copy = f32[8,4]{1,0} copy(%ard)
  ROOT %f = f32[8,4]{1,0} fusion(%copy), kind=kCustom, calls=%fused_computation, backend_config={"kind":"__triton_gemm"}
}
"""
    facts = programs.program_facts(text)
    assert facts["kernels"] == {"cudnn": 1, "gemm_fusions": 1, "cublas": 0, "other_fusions": 0, "copies": 1,
                                "transposes": 0, "collectives": 1, "other": 0, "total": 4}
    assert facts["collectives"] == {"all-reduce": {"count": 1, "bytes": 128}}
    conv_bytes = 2 * 8 * 8 * 3 * 2 + 3 * 3 * 3 * 4 * 2 + 2 * 8 * 8 * 4 * 2
    assert facts["bytes_moved"] == conv_bytes + 128 * 2 + 128 * 2 + 128 * 2
    assert facts["cudnn_calls"] == [{"target": "__cudnn$convForward", "window": "3x3", "activation": "",
                                     "operands": ["bf16[2,8,8,3]", "bf16[3,3,3,4]"],
                                     "op_name": "jit(step)/block1/conv/conv_general_dilated"}]
    assert programs.f32_compute(text) == ["d (no op_name)"]
    assert facts["entry_parameters"] == {"a": "bf16[2,8,8,3]{3,2,1,0}", "w": "bf16[3,3,3,4]{3,2,1,0}",
                                         "g": "f32[8,4]{1,0}"}


class _Stage:
    """A lowered or compiled step whose cost analysis comes in the shape `analysis` gives."""

    def __init__(self, analysis):
        self._analysis = analysis

    def cost_analysis(self):
        if isinstance(self._analysis, Exception):
            raise self._analysis
        return self._analysis


@pytest.mark.parametrize("analysis, flops", [
    ({"flops": 12.0, "bytes accessed": 3.0}, 12.0),  # jax 0.7 to 0.10
    ([{"flops": 12.0}], 12.0),  # older jax: one dict per program
    ([], None),
    (None, None),  # jax 0.11 on a GPU, for a lowered step
    ({"bytes accessed": 3.0}, None),
    (NotImplementedError("no cost analysis on this backend"), None),
])
def test_xla_flops_reads_every_shape_of_cost_analysis(analysis, flops):
    assert planning.xla_flops(_Stage(analysis)) == flops


def test_the_flops_come_from_the_compiled_step_where_the_lowered_one_has_none():
    from jax import stages

    config = Config(resize=67, batch_size=8)
    with mock.patch.object(stages.Lowered, "cost_analysis", return_value=None):
        flops, eval_flops = planning.step_flops(config)
        assert flops and 8 * 1e8 < flops < 8 * 1e9
        assert 0.2 * flops < eval_flops < 0.5 * flops  # the forward pass alone: about a third
        with mock.patch.object(stages.Compiled, "cost_analysis", return_value=[None]):
            assert planning.step_flops(config) == (None, None)


def test_a_plan_of_the_attached_cpu_without_flops_prints_everything_else(capsys):
    """`--target local` on a CPU, a kind without published figures, on a JAX that counts no FLOPs:
    the table without a roofline, and the FLOPs said to be missing."""
    from jax import stages

    with mock.patch.object(stages.Lowered, "cost_analysis", return_value=None), \
            mock.patch.object(stages.Compiled, "cost_analysis", return_value=None):
        status = command.main(["--target", "local", "--resize", "67", "--batch_size", "8", "--no-largest_batch"])
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    assert status == 0
    assert rows["FLOPs"] == "not reported by this JAX"
    assert rows["target"].startswith("cpu (attached): 4 cpu devices") and rows["compiled"].startswith("yes")
    assert rows["fits"].startswith("yes") and "the host's memory" in rows["fits"]
    assert rows["roofline"].startswith("none: no published peaks for cpu (attached)")


def test_a_roofline_without_flops_is_the_memory_bound_alone():
    bound = planning.roofline(targets.TARGETS["h200"], 1, Config(batch_size=128, dtype="bfloat16"), None, 4.8e9)
    assert bound["compute_seconds"] is None and bound["bound"] == "memory"
    assert bound["step_seconds"] == pytest.approx(1e-3) and bound["images_per_sec"] == pytest.approx(128_000)
    assert "compute unknown (FLOPs not reported)" in command._format_roofline(bound, "H200")


@NEEDS_CUDA_PLUGIN
def test_plan_leaves_the_persistent_compilation_cache_alone(tmp_path):
    """Found by tests/test_train_flag_draws.py: with JAX_COMPILATION_CACHE_DIR set, a second plan read the
    entry the first had written for the compile-only GPU, could not load it, and printed JAX's
    UserWarning ('PjRtCompiler must be constructed with a Client')."""
    env = {**CPU_ENV, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
    for _ in range(2):
        result = subprocess.run([sys.executable, "-m", "nin_jax.plan", "--target=h100", "--resize=67", "--batch_size=8",
                                 "--no-largest_batch"], capture_output=True, text=True, timeout=300, env=env,
                                cwd=REPO_ROOT)
        assert result.returncode == 0 and result.stderr == "", result.stderr


def test_plan_names_itself_when_it_refuses_a_recipe(capsys):
    """Found by tests/test_train_flag_draws.py: the recipe, read before the other flags, was refused as
    `plan.py: error: ...`."""
    with pytest.raises(SystemExit) as end:
        command.main(["--target", "h100", "--recipe", ""])
    assert end.value.code == 2
    assert capsys.readouterr().err.startswith("python -m nin_jax.plan: error: argument --recipe: invalid choice: ''")
