"""--profile_steps: a jax.profiler trace of a few training steps in the workdir, and the table of
where the step's time went (nin_jax/run/profile_report.py)."""

import glob
import gzip
import json
import os
import subprocess
import sys

import pytest

from nin_jax.run import profile_report, profiling
from nin_jax import trainer
from nin_jax.config import Config

from conftest import REPO_ROOT, run_cli


@pytest.mark.parametrize("profile_steps, traced", [(2, 2), (5, 3)])  # 4 steps: the first is never traced
def test_profile_steps_writes_a_trace_of_the_steps_after_the_first(fake_data, tmp_path, profile_steps, traced):
    config = Config(resize=67, batch_size=8, num_epochs=1, train_examples=32, eval_examples=8, parallel="jit",
                    profile_steps=profile_steps)
    lines = []
    with fake_data(32):
        trainer.train_and_evaluate(config, str(tmp_path), log=lines.append)
    directory = tmp_path / profiling.PROFILE_DIR
    (run,) = glob.glob(str(directory / "plugins" / "profile" / "*"))
    assert glob.glob(os.path.join(run, "*.xplane.pb"))  # what TensorBoard's profile plugin reads
    with gzip.open(os.path.join(run, "perfetto_trace.json.gz")) as f:
        trace = json.load(f)
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any("train_step" in name for name in names)
    text = "\n".join(lines)
    assert f"wrote a profile of {traced} training steps to {directory}; view it at https://ui.perfetto.dev" in text
    assert "pip install -e '.[profile]'" in text
    # On a CPU the table holds XLA's host-side ops, placed by the saved program's JAX op names.
    assert f"{traced} traced train steps on /host:CPU: " in text and "ms of XLA's host-side ops" in text
    report = profile_report.report(str(directory))
    assert report["steps"] == traced and report["named"] > report["kernels"] / 2
    assert all(report["table_ms"][f"block {block}"]["forward"] > 0 for block in range(1, 5))
    assert report["table_ms"]["block 2"]["backward"] > 0 and len(report["largest"]) == 10
    assert (directory / profile_report.HLO_FILE).read_text().startswith("HloModule jit_carried_train_step")


def test_profile_steps_without_a_workdir_is_one_line():
    result = run_cli("--profile_steps", "3", "--data_dir", "/nonexistent")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "--profile_steps needs a --workdir to write the trace into" in result.stderr


def test_no_trace_unless_asked(fake_data, tmp_path):
    with fake_data(16):
        trainer.train_and_evaluate(Config(resize=67, batch_size=8, num_epochs=1, parallel="jit"), str(tmp_path),
                                   log=lambda line: None)
    assert profiling.PROFILE_DIR not in os.listdir(tmp_path)


def write_trace(directory, events, steps):
    """A trace folder as jax.profiler writes one, with `events` and the steps file of StepTrace."""
    run = directory / "plugins" / "profile" / "2026_01_01_00_00_00"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    (directory / profile_report.STEPS_FILE).write_text(json.dumps({"steps": steps}))


def test_a_gpu_trace_is_grouped_by_block_and_pass_from_each_kernels_jax_name(tmp_path):
    """The shape of a GPU trace: kernels on a device process, each carrying its JAX op name in
    args.name; host events and other modules' kernels are left out."""
    def kernel(name, op, start, duration, module="jit_carried_train_step", pid=2):
        return {"ph": "X", "pid": pid, "tid": 7, "name": name, "ts": start, "dur": duration,
                "args": {"hlo_module": module, "hlo_op": name.lower(), "name": f"jit(carried_train_step)/{op}"}}

    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        kernel("StemConv", "jvp(NiN)/block1/conv/conv_general_dilated", 0, 400),
        kernel("StemWgrad", "transpose(jvp(NiN))/block1/conv/conv_general_dilated", 500, 600),
        kernel("PoolGrad", "transpose(jvp(NiN))/jvp(NiN)/jit(_where)/select_n", 1100, 300),
        kernel("Resize", "jit(_resize)/dot_general", 1400, 100),
        kernel("Sgd", "sgd/add", 1900, 100),  # 400 us idle before it
        kernel("Launch", "jvp(NiN)/block1/conv/conv_general_dilated", 0, 50, pid=1),  # host side
        kernel("EvalConv", "jvp(NiN)/block2/conv/conv_general_dilated", 5000, 500, module="jit_totalled_eval_step"),
    ]
    write_trace(tmp_path, events, steps=2)
    report = profile_report.report(str(tmp_path))
    assert report["place"] == "/device:GPU:0" and report["kernels"] == report["named"] == 5
    assert report["kernel_ms_per_step"] == pytest.approx(1.5 / 2)
    assert report["busy_share"] == pytest.approx(1.5 / 2.0) and report["window_ms_per_step"] == pytest.approx(1.0)
    table = report["table_ms"]
    assert table["block 1"] == {"forward": pytest.approx(0.2), "backward": pytest.approx(0.3)}
    assert table[profile_report.PARTS[4]]["backward"] == pytest.approx(0.15)
    assert table[profile_report.PARTS[5]]["forward"] == pytest.approx(0.05)
    assert table[profile_report.PARTS[6]]["forward"] == pytest.approx(0.05)
    assert [kernel["name"] for kernel in report["largest"]] == ["StemWgrad", "StemConv", "PoolGrad", "Resize", "Sgd"]
    text = profile_report.format_report(report)
    assert text.splitlines()[0] == ("2 traced train steps on /device:GPU:0: 0.750 ms of kernels per step; busy 75% of "
                                    "the 1.000 ms per step from the first to the last")
    assert "   0.300  40.0%  block 1, backward: StemWgrad (stemwgrad)" in text


def test_the_report_command_says_in_one_line_where_there_is_no_trace(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nin_jax.profile_report", str(tmp_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"python -m nin_jax.profile_report: error: {tmp_path} holds no trace")
    assert len(result.stderr.strip().splitlines()) == 1
