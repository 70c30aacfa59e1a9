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
    assert f"{traced} traced train steps (by the trace's run ids) on /host:CPU: " in text
    assert "ms of XLA's host-side ops" in text
    report = profile_report.report(str(directory))
    assert report["steps"] == traced and report["named"] > report["kernels"] / 2
    assert all(report["table_ms"][f"block {block}"]["forward"] > 0 for block in range(1, 5))
    assert report["table_ms"]["block 2"]["backward"] > 0 and len(report["largest"]) == 10
    assert (directory / profile_report.HLO_FILE).read_text().startswith("HloModule jit_carried_train_step")
    # A trace taken by hand has no steps file: the command counts the steps in the trace itself.
    (directory / profile_report.STEPS_FILE).unlink()
    result = subprocess.run([sys.executable, "-m", "nin_jax.profile_report", str(directory)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{traced} traced train steps (by the trace's run ids) on /host:CPU: ")
    assert profile_report.report(str(directory))["kernel_ms_per_step"] == pytest.approx(report["kernel_ms_per_step"])


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


def write_trace(directory, events, steps=None):
    """A trace folder as jax.profiler writes one, with `events`, and the steps file of StepTrace
    unless `steps` is None (a trace taken by hand)."""
    run = directory / "plugins" / "profile" / "2026_01_01_00_00_00"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    if steps is not None:
        (directory / profile_report.STEPS_FILE).write_text(json.dumps({"steps": steps}))


GPU_PROCESSES = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
                 {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}}]


def kernel(name, op, start, duration, module="jit_carried_train_step", pid=2, **args):
    """A GPU kernel's event: on a device process, its JAX op name in args.name."""
    return {"ph": "X", "pid": pid, "tid": 7, "name": name, "ts": start, "dur": duration,
            "args": {"hlo_module": module, "hlo_op": name.lower(), "name": f"jit(carried_train_step)/{op}", **args}}


def train_step_kernels(start):
    """One execution of the train step's program from `start` (us): 1.5 ms of kernels in 2 ms."""
    return [kernel("StemConv", "jvp(NiN)/block1/conv/conv_general_dilated", start, 400),
            kernel("StemWgrad", "transpose(jvp(NiN))/block1/conv/conv_general_dilated", start + 500, 600),
            kernel("PoolGrad", "transpose(jvp(NiN))/jvp(NiN)/jit(_where)/select_n", start + 1100, 300),
            kernel("Resize", "jit(_resize)/dot_general", start + 1400, 100),
            kernel("Sgd", "sgd/add", start + 1900, 100)]  # 400 us idle before it


def test_a_gpu_trace_is_grouped_by_block_and_pass_from_each_kernels_jax_name(tmp_path):
    """The shape of a GPU trace: kernels on a device process, each carrying its JAX op name in
    args.name; host events and other modules' kernels are left out. Two executions of the step,
    counted from the runs of each op (each kernel ran twice)."""
    events = [
        *GPU_PROCESSES, *train_step_kernels(0), *train_step_kernels(2000),
        kernel("Launch", "jvp(NiN)/block1/conv/conv_general_dilated", 0, 50, pid=1),  # host side
        kernel("EvalConv", "jvp(NiN)/block2/conv/conv_general_dilated", 5000, 500, module="jit_totalled_eval_step"),
    ]
    write_trace(tmp_path, events, steps=2)
    report = profile_report.report(str(tmp_path))
    assert report["place"] == "/device:GPU:0" and report["kernels"] == report["named"] == 10
    assert (report["steps"], report["steps_from"], report["steps_note"]) == (2, "the trace's runs of each op", "")
    assert report["kernel_ms_per_step"] == pytest.approx(1.5)
    assert report["busy_share"] == pytest.approx(0.75) and report["window_ms_per_step"] == pytest.approx(2.0)
    table = report["table_ms"]
    assert table["block 1"] == {"forward": pytest.approx(0.4), "backward": pytest.approx(0.6)}
    assert table[profile_report.PARTS[4]]["backward"] == pytest.approx(0.3)
    assert table[profile_report.PARTS[5]]["forward"] == pytest.approx(0.1)
    assert table[profile_report.PARTS[6]]["forward"] == pytest.approx(0.1)
    assert [kernel["name"] for kernel in report["largest"]] == ["StemWgrad", "StemConv", "PoolGrad", "Resize", "Sgd"]
    text = profile_report.format_report(report)
    assert text.splitlines()[0] == ("2 traced train steps (by the trace's runs of each op) on /device:GPU:0: 1.500 ms "
                                    "of kernels per step; busy 75% of the 2.000 ms per step from the first to the last")
    assert "   0.600  40.0%  block 1, backward: StemWgrad (stemwgrad)" in text


def module_run(start, program_id=42):
    """An execution of the train step's program on the device's "XLA Modules" line."""
    return {"ph": "X", "pid": 2, "tid": 9, "name": f"jit_carried_train_step({program_id})", "ts": start, "dur": 2000}


def three_steps_one_op_again():
    """Three executions, and a kernel that ran a fourth time: the runs of the ops disagree."""
    return [*GPU_PROCESSES, *(event for start in (0, 2000, 4000) for event in train_step_kernels(start)),
            kernel("Sgd", "sgd/add", 6000, 100)]


@pytest.mark.parametrize("events, steps_file, steps, steps_from, note", [
    ([*GPU_PROCESSES, *(kernel("Conv", "block1/conv", 100 * run, 50, run_id=str(run)) for run in range(4))],
     None, 4, "the trace's run ids", ""),
    ([*three_steps_one_op_again(), *map(module_run, (0, 2000, 4000))], 5, 3, "the trace's XLA Modules line",
     "steps.json says 5; the trace's count is used"),
    (three_steps_one_op_again(), 3, 3, "steps.json", "the trace does not say (the runs of its ops disagree)"),
    (three_steps_one_op_again(), None, None, "", "the trace does not say how many train steps it holds (the runs of "
                                                 "its ops disagree) and {folder} has no steps.json"),
], ids=["run ids", "modules line, steps.json differs", "steps.json alone", "neither"])
def test_the_number_of_steps_comes_from_the_trace_with_steps_json_as_a_cross_check(tmp_path, events, steps_file,
                                                                                     steps, steps_from, note):
    """A trace taken by hand has no steps.json; one whose count the trace does not give is
    reported for the whole trace, not divided by a guess."""
    write_trace(tmp_path, events, steps_file)
    report = profile_report.report(str(tmp_path))
    assert (report["steps"], report["steps_from"], report["steps_note"]) == (steps, steps_from,
                                                                           note.format(folder=tmp_path))
    headline = profile_report.format_report(report).splitlines()[0]
    if steps is None:
        assert headline.startswith("a trace of an unknown number of train steps on /device:GPU:0: ")
        assert "ms of kernels in the whole trace" in headline
        assert report["kernel_ms_per_step"] == pytest.approx(sum(event.get("dur", 0) for event in events) / 1e3)
    else:
        assert headline.startswith(f"{steps} traced train steps (by {steps_from}) on /device:GPU:0: ")


def test_the_report_command_says_in_one_line_where_there_is_no_trace(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nin_jax.profile_report", str(tmp_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"python -m nin_jax.profile_report: error: {tmp_path} holds no trace")
    assert len(result.stderr.strip().splitlines()) == 1
