"""The suite runs on the CPU, whatever accelerator the machine has, with four fake CPU devices for
the pmap and sharding tests, programs compiled without LLVM's optimizations, and a compilation
cache shared by the test run and the training processes it starts; all must be set before JAX
starts.

Tests marked `accelerator` (tests/test_accelerator.py) run only where JAX finds a GPU or TPU; they
run their checks in processes without the CPU pin.

The helpers that several test modules use are here, each once: test modules import them with
`from conftest import ...` (this folder is on the path in pytest's default import mode, the
subfolders' tests included), never from one another."""

import atexit
import dataclasses
import os
import shutil
import tempfile

# LLVM's optimizations off: the suite checks what the programs compute, not how fast they run, and
# NiN's steps compile about twice as fast on a CPU (a small train.py job from a cold cache: 36 s -> 20 s).
QUICK_COMPILE = "--xla_backend_optimization_level=0"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:  # a test may start processes with fewer
    _flags += " --xla_force_host_platform_device_count=4"
if "xla_backend_optimization_level" not in _flags:
    _flags += f" {QUICK_COMPILE}"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ["JAX_PLATFORMS"] = "cpu"  # tests that expect '4 cpu devices' pass on a machine with a GPU too
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # each compile of NiN's steps takes seconds on a CPU
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nin_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_FASHION_MNIST = os.path.join(REPO_ROOT, "..", "shared", "data", "fashion_mnist")
NEEDS_SHARED_FASHION_MNIST = pytest.mark.skipif(not os.path.isdir(SHARED_FASHION_MNIST),
                                                reason=f"the Fashion-MNIST files are not in {SHARED_FASHION_MNIST}")
# `train.py` on `fake_fashion_mnist` data in a process of its own (its docstring says how).
HELPER = os.path.join(REPO_ROOT, "tests", "fake_data_train.py")
# The environment of the commands a test starts: pinned to the CPU, their lines unbuffered.
CPU_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def _cuda_plugin_installed() -> bool:
    from nin_jax.tools.plan import targets

    return any(map(targets._importable, targets.CUDA_PLUGINS))


# The plan compiles for a GPU with jax's CUDA plugin ('.[plan]'); an environment without it (CI's
# newest-JAX one) leaves those cases to the environments that have it.
NEEDS_CUDA_PLUGIN = pytest.mark.skipif(not _cuda_plugin_installed(),
                                       reason="the plan for a GPU needs jax's CUDA plugin ('.[plan]')")


# ---------------------------------------------------------------------------------------------
# Data.

@contextlib.contextmanager
def mock_fashion_mnist(num_examples: int):
    """tfds' random stand-in for Fashion-MNIST: `num_examples` random images per split, read from
    tfds even where a copy of a real build lies in the data dir (`nin_jax.data.data_arrays`)."""
    import tensorflow_datasets as tfds

    from nin_jax.data import data_arrays

    with tfds.testing.mock_data(num_examples=num_examples), mock.patch.object(
        tfds.core.DatasetBuilder, "is_prepared", return_value=True
    ), mock.patch.object(data_arrays, "read_copy", return_value=None):
        yield


@contextlib.contextmanager
def fake_fashion_mnist(num_examples: int):
    """Random uint8 images and labels in place of the tfds dataset, the same in every process;
    faster than `mock_fashion_mnist` for tests of the training loop, which do not need tfds."""
    import numpy as np

    from nin_jax.data import dataset
    from nin_jax import input_pipeline

    rng = np.random.default_rng(0)
    datasets = {
        split: input_pipeline.Split(
            rng.integers(0, 256, (num_examples, 28, 28, 1), dtype=np.uint8),
            rng.integers(0, input_pipeline.NUM_CLASSES, num_examples, dtype=np.int32),
        )
        for split in ("train", "test")
    }
    with mock.patch.object(dataset, "load_fashion_mnist", return_value=datasets):
        yield


def random_batch(batch_size: int, num_real: int, seed: int = 0):
    """An eval batch of `batch_size` with `num_real` random examples, the rest padding."""
    import numpy as np

    from nin_jax import input_pipeline

    rng = np.random.default_rng(seed)
    split = input_pipeline.Split(
        rng.integers(0, 256, (num_real, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, num_real, dtype=np.int32)
    )
    return next(input_pipeline.eval_batches(split, batch_size))


def numbered_split(num_examples: int):
    """Image i is filled with the value i % 251 + 1 and labelled i % 10, so batches can be traced back."""
    import numpy as np

    from nin_jax import input_pipeline

    ids = np.arange(num_examples)
    images = np.broadcast_to((ids % 251 + 1).astype(np.uint8)[:, None, None, None], (num_examples, 28, 28, 1))
    return input_pipeline.Split(np.array(images), (ids % 10).astype(np.int32))


def random_arrays(path, train_examples: int, test_examples: int) -> None:
    """Random splits of these sizes in an .npz that --data_arrays reads."""
    import numpy as np

    from nin_jax.data import data_arrays
    from nin_jax import input_pipeline

    rng = np.random.default_rng(0)
    split = lambda n: input_pipeline.Split(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),  # noqa: E731
                                           rng.integers(0, 10, n, dtype=np.int32))
    data_arrays.save({"train": split(train_examples), "test": split(test_examples)}, str(path))


# ---------------------------------------------------------------------------------------------
# Steps, as the training loop runs them.

def _step_config():
    from nin_jax.config import Config

    return Config(resize=67, batch_size=16, dropout_rate=0.0)


STEP_CONFIG = _step_config()  # the steps' tests: a batch of 16, no dropout unless a test turns it on


def make_strategy(kind, config, devices=None):
    """The strategy of `runtime.parallel` that `kind` names (jit, pmap, sharding, or auto: the
    trainer's choice), for the loop steps of `config`, as the trainer makes it."""
    from nin_jax import trainer
    from nin_jax.runtime import parallel

    config = config if kind == "auto" else dataclasses.replace(config, parallel=kind)
    return parallel.create_strategy(config, trainer.loop_steps(config), devices)


def one_train_step(strategy, state, batch):
    """One train step on its own, through the loop's call: the new state and the step's metric sums."""
    state, carry = strategy.train_step(state, strategy.zero_carry(), batch)
    return state, carry["metrics"]


def one_eval_step(strategy, state, batch):
    """The metric sums of one eval step on its own."""
    return strategy.eval_step(state, strategy.zero_totals(), batch)


def float64():
    """A context in which JAX computes in float64: `jax.enable_x64` where JAX has it (0.10 and 0.12
    do), `jax.experimental.enable_x64` where it does not (the oldest supported JAX, 0.7.2)."""
    import jax

    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64(True)


# ---------------------------------------------------------------------------------------------
# Commands in processes of their own.

# A small job of `fake_data_train.py` or train.py: 2 steps of 8, evaluated on 8 examples.
# With the suite's compile cache (CPU_ENV's JAX_COMPILATION_CACHE_DIR): its steps compile once a test run.
SMALL_JOB = ["--resize=67", "--batch_size=8", "--num_epochs=1", "--train_examples=16", "--eval_examples=8"]
SMALL_JIT_JOB = [*SMALL_JOB, "--parallel=jit"]
SMALL_JOB_EXAMPLES = 64  # per split of the fake data or data arrays that a small job reads
ABSURD_SIZE = 2**28  # of a crafted file, made sparse: no disk is filled
SAVE_BOUND_S = 60  # a run whose save failed must have ended by then


def run_cli(*args, **env):
    """train.py ARGS, with `env` added to this process's environment."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "train.py"), *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )


def load_benchmark(name):
    """benchmarks/<name>.py as a module, with benchmarks/ on the path for the modules it imports
    (as when it runs as a script)."""
    import importlib.util

    folder = os.path.join(REPO_ROOT, "benchmarks")
    if folder not in sys.path:
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def xla_flags(devices: int = 1) -> str:
    """The XLA_FLAGS of a process that a test starts with `devices` CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {QUICK_COMPILE}"


def run_script(*args, env=None, timeout=600):
    """The command ARGS in the repository, on one CPU device."""
    return subprocess.run(list(args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "XLA_FLAGS": xla_flags(), **(env or {})})


def limited_address_space() -> None:
    """A `preexec_fn`: the least address space every command accepts (nin_jax/runtime/limits.py),
    for a process that must refuse at once, so that a test of it that fails by allocating fails fast."""
    import resource

    from nin_jax.runtime.limits import MIN_ADDRESS_SPACE_GIB

    resource.setrlimit(resource.RLIMIT_AS, (MIN_ADDRESS_SPACE_GIB * 2**30,) * 2)


def run_on_cpu(args, timeout=60, env=CPU_ENV, **kwargs):
    """`python ARGS` in the repository, pinned to the CPU (by CPU_ENV, or an ENV made from it)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO_ROOT, **kwargs)


def module_run(module, *args, env=None, timeout=120, **kwargs):
    """`python -m MODULE ARGS` pinned to the CPU, with `env` added; its output as bytes."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, timeout=timeout,
                          env={**CPU_ENV, **(env or {})}, cwd=REPO_ROOT, **kwargs)


def fake_run(*args, examples=SMALL_JOB_EXAMPLES, text=False, env=None, cwd=None, timeout=120):
    """tests/fake_data_train.py EXAMPLES ARGS: train.py on `examples` fake examples per split, or
    with `predict` first, the predict command; pinned to the CPU, with `env` added. Its output as
    bytes (a C locale writes escapes), or as text."""
    return subprocess.run([sys.executable, HELPER, str(examples), *args], capture_output=True, text=text,
                          timeout=timeout, env={**CPU_ENV, **(env or {})}, cwd=cwd)


def one_line(result) -> str:
    """The single line a refused command wrote on stderr (bytes: a C locale writes escapes)."""
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    assert len(lines) == 1, result.stderr.decode(errors="replace")
    return lines[0]


def saved_steps(workdir) -> list[int]:
    """The steps of the checkpoints in `workdir`, oldest first; none where it has no checkpoints yet."""
    from nin_jax.run.checkpoints import CHECKPOINT_DIR

    folder = os.path.join(workdir, CHECKPOINT_DIR)
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit()) if os.path.isdir(folder) else []


@contextlib.contextmanager
def mounted_tmpfs(folder, size: str):
    """A filesystem of `size` in memory, mounted at the new `folder` (as root only), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


# ---------------------------------------------------------------------------------------------
# A run on fake data that tests stop, kill and resume, in this process or in one of its own.

NUM_EXAMPLES = 40  # per split of the fake data: 5 steps of 8
# The batch size, learning rate and dropout of tests/test_trainer.py: the compiled steps come from the cache.
RESUME_SETTINGS = dict(resize=67, batch_size=8, num_epochs=2, eval_examples=13, checkpoint_every_steps=1)
STEPS_PER_EPOCH = 5  # 40 examples in batches of 8
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
TIMING_FIELDS = {"examples_per_sec", "train_seconds", "compile_seconds"}
TIMEOUT_S = 120


def resume_config(**changes):
    """The Config of RESUME_SETTINGS with `changes`."""
    from nin_jax.config import Config

    return Config(**{**RESUME_SETTINGS, **changes})


def resume_flags(**changes) -> list[str]:
    return [f"--{name}={value}" for name, value in {**RESUME_SETTINGS, **changes}.items()]


def assert_same_state(a, b) -> None:
    import jax
    import numpy as np
    from flax import serialization

    jax.tree_util.tree_map(np.testing.assert_array_equal, serialization.to_state_dict(a), serialization.to_state_dict(b))


def deterministic(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in TIMING_FIELDS} for record in records]


@contextlib.contextmanager
def training_process(workdir, log_path, env=(), wrapper=(), **changes):
    """`fake_data_train.py` in a process of its own, started through the command `wrapper` if any
    (`timeout`), with stdout and stderr in `log_path` and `env` added to its environment; killed on
    leaving the block if it is still running."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*wrapper, sys.executable, HELPER, str(NUM_EXAMPLES), *resume_flags(**changes), f"--workdir={workdir}"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **dict(env)},
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def wait_until(condition, process, log_path, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        with open(log_path) as log:
            assert process.poll() is None, f"training ended before the test could stop it:\n{log.read()}"
        assert time.monotonic() < deadline, f"training did not get there in {timeout_s} s:\n{log_path.read_text()}"
        time.sleep(0.02)


def uninterrupted_run(workdir, parallel: str, **changes):
    """The reference: a run of RESUME_SETTINGS in this process, never stopped."""
    from nin_jax import trainer

    with fake_fashion_mnist(NUM_EXAMPLES):
        return trainer.train_and_evaluate(resume_config(parallel=parallel, **changes), str(workdir),
                                          log=lambda line: None)


def resume(workdir, parallel: str, fake_data, **changes):
    """The same run again, in this process: the state, the records and the lines it logs."""
    from nin_jax import trainer

    lines = []
    with fake_data(NUM_EXAMPLES):
        state, records = trainer.train_and_evaluate(resume_config(parallel=parallel, **changes), str(workdir),
                                                    log=lines.append)
    return state, records, lines


# ---------------------------------------------------------------------------------------------
# Jobs of several processes on localhost.

JOB_TIMEOUT_S = 240  # each job; the machine may be busy
PEER_TIMEOUT_S = 6
# Two processes of two fake CPU devices each.
JOB_ENV = {**os.environ, "XLA_FLAGS": xla_flags(2), "PYTHONUNBUFFERED": "1"}
# 100 steps of 8 examples, checkpointed every 5: long enough to kill a process in the middle.
JOB_FLAGS = ["--resize=67", "--batch_size=8", "--num_epochs=1", "--eval_examples=13", "--dropout_rate=0",
             "--parallel=pmap", "--checkpoint_every_steps=5", "--log_every_steps=1", "--num_processes=2",
             f"--peer_timeout_seconds={PEER_TIMEOUT_S}"]
JOB_EXAMPLES = 800


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def processes(commands, env, log_dir):
    """Starts every command; on leaving, kills whichever still runs."""
    running = []
    try:
        for rank, command in enumerate(commands):
            with open(os.path.join(log_dir, f"process{rank}.log"), "w") as log:
                running.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
        yield running
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
            process.wait()


class Job:
    """The processes of one localhost job, each with its stdout and stderr in files; `close` kills
    whichever still runs."""

    def __init__(self, workdir, log_dir, name: str, extra_flags=()):
        flags = [*JOB_FLAGS, f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{free_loopback_port()}",
                 *extra_flags]
        self.paths = [(log_dir / f"{name}{rank}.out", log_dir / f"{name}{rank}.err") for rank in range(2)]
        self.processes = []
        for rank, (out, err) in enumerate(self.paths):
            with open(out, "w") as out_file, open(err, "w") as err_file:
                command = [sys.executable, HELPER, str(JOB_EXAMPLES), *flags, f"--process_id={rank}"]
                self.processes.append(subprocess.Popen(command, stdout=out_file, stderr=err_file, env=JOB_ENV))

    def stdout(self, rank: int) -> str:
        return self.paths[rank][0].read_text()

    def stderr(self, rank: int) -> str:
        return self.paths[rank][1].read_text()

    def wait_for(self, condition, what: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {[self.stdout(r) for r in range(2)]}"
            assert all(process.poll() is None for process in self.processes), [self.stderr(r) for r in range(2)]
            time.sleep(0.2)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


# ---------------------------------------------------------------------------------------------
# Fixtures.

@pytest.fixture
def mock_data():
    return mock_fashion_mnist


@pytest.fixture
def fake_data():
    return fake_fashion_mnist


MOCK_EXAMPLES = 20  # per split of `trained_run`'s data: 3 steps of 8 per epoch, the last one padded


def _trained_run_config():
    from nin_jax.config import Config

    return Config(resize=67, batch_size=8, num_epochs=2, parallel="jit", log_every_steps=2)


TRAINED_RUN_CONFIG = _trained_run_config()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One short run, with the CPU estimate switched on for its few seconds; it leaves checkpoints."""
    from nin_jax import trainer
    from nin_jax.run import cpu_estimate

    workdir = str(tmp_path_factory.mktemp("run"))
    lines = []
    with mock_fashion_mnist(MOCK_EXAMPLES), pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_estimate, "SAY_FROM_SECONDS", 0)
        state, records = trainer.train_and_evaluate(TRAINED_RUN_CONFIG, workdir, log=lines.append)
    return {"workdir": workdir, "state": state, "records": records, "lines": lines}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """The workdir of a finished SMALL_JIT_JOB of `fake_data_train.py`: its checkpoint is of step 2."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    result = fake_run(*SMALL_JIT_JOB, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr.decode()
    return workdir


# A small run on data arrays, which train.py reads without the suite's fake data (and its CPU pin),
# with the suite's compile cache (above): each compile once.
TWO_EPOCH_JOB = ["--resize=67", "--batch_size=8", "--num_epochs=2", "--train_examples=16", "--eval_examples=8",
                 "--parallel=jit"]


@pytest.fixture(scope="session")
def arrays(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "fashion_mnist.npz"
    random_arrays(path, SMALL_JOB_EXAMPLES, SMALL_JOB_EXAMPLES)
    return path


@pytest.fixture(scope="session")
def trained(arrays, tmp_path_factory):
    """The workdir of a finished TWO_EPOCH_JOB of train.py on `arrays`, which export and predict read."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    result = subprocess.run([sys.executable, "train.py", *TWO_EPOCH_JOB, f"--data_arrays={arrays}",
                             f"--workdir={workdir}"], capture_output=True, text=True, timeout=300, env=CPU_ENV,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    return workdir


def command_line(command: str, workdir, tmp_path, arrays=None) -> list[str]:
    """The command's arguments after `python`: a small job of each."""
    return {"train": ["train.py", *TWO_EPOCH_JOB, f"--data_arrays={arrays}", f"--workdir={tmp_path / 'run'}"],
            "export": ["-m", "nin_jax.export", f"--workdir={workdir}", f"--out={tmp_path / 'nin.jax_exported'}"],
            "predict": ["-m", "nin_jax.predict", f"--workdir={workdir}"],
            "plan": ["-m", "nin_jax.plan", "--target=h100"],  # compiles for tens of seconds
            "plan_local": ["-m", "nin_jax.plan", "--target=local"]}[command]


def prog(command: str) -> str:
    return "train.py" if command == "train" else f"python -m nin_jax.{command.split('_')[0]}"


@pytest.fixture
def read_only_run(tmp_path):
    """A finished run's workdir on a filesystem then mounted read-only, as a shared results disk."""
    with mounted_tmpfs(tmp_path / "disk", "40M") as disk:
        result = fake_run("--resize=67", "--batch_size=32", "--num_epochs=1", "--eval_examples=32", "--parallel=jit",
                          f"--workdir={disk / 'run'}", examples=256, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        yield disk / "run"


@contextlib.contextmanager
def once_per_test_run(tmp_path_factory, name: str):
    """A folder that every test process of this run shares, `name` under pytest's base folder, and
    whether it still has to be made: the first process to ask makes it while it holds the folder's
    lock, the others wait for the lock and find it made. So each costly fixture is made once, not
    once per `-n` worker."""
    base = tmp_path_factory.getbasetemp()
    base = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, made = base / name, base / f"{name}.made"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        to_make = not made.exists()
        if to_make:
            shutil.rmtree(folder, ignore_errors=True)  # what a failed maker left
            folder.mkdir()
        yield folder, to_make
        made.touch()


@pytest.fixture(scope="session")
def two_first_builds(tmp_path_factory):
    """The suite's one build of Fashion-MNIST, from the four files in ../shared, as two users may
    start it: two `python -m nin_jax.export_arrays` that find it unbuilt in one data dir, the second
    started while the first builds (it waits, then reads what the first built). Made once per test
    run (a build takes 45 s alone); its data dir, and each process's pid, exit status, output and
    .npz (tests/runtime/test_locks.py checks them)."""
    import json

    with once_per_test_run(tmp_path_factory, "tfds") as (folder, to_make):
        if to_make:
            (folder / "builds.json").write_text(json.dumps(_race_to_build(folder)))
    return json.loads((folder / "builds.json").read_text())


def _race_to_build(folder) -> dict:
    data_dir = folder / "tfds"
    lock = data_dir / "fashion_mnist.lock"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    outs = [str(folder / f"{name}.npz") for name in ("first", "second")]

    def export(out: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "nin_jax.export_arrays", "--data_dir", str(data_dir),
                   "--manual_dir", SHARED_FASHION_MNIST, "--out", out]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    exports = [export(outs[0])]
    try:
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text()):  # the first holds the lock: it is building
            assert exports[0].poll() is None and time.monotonic() < deadline, exports[0].communicate()
            time.sleep(0.05)
        exports.append(export(outs[1]))
        outputs = [process.communicate(timeout=300) for process in exports]
    finally:
        for process in exports:
            process.kill()
            process.wait()
    return {"data_dir": str(data_dir),
            "builds": [{"pid": process.pid, "returncode": process.returncode, "stdout": stdout, "stderr": stderr,
                        "out": out} for process, (stdout, stderr), out in zip(exports, outputs, outs)]}


@pytest.fixture(scope="session")
def data_dir(two_first_builds):
    """The data dir of the suite's one build; the tests that use it are marked
    NEEDS_SHARED_FASHION_MNIST and only read it."""
    assert [build["returncode"] for build in two_first_builds["builds"]] == [0, 0], two_first_builds["builds"]
    return two_first_builds["data_dir"]


# The one run on the real data: 64 SGD steps of the strong recipe at 131x131, the smallest size
# whose class maps have a centre (3x3; 2x2 at 99, each cell seeing the whole image, did not show
# where the garment is: docs/exercises.md); as many pixels trained as 256 steps at 67x67.
REAL_DATA_RUN_FLAGS = ["--recipe=strong", "--resize=131", "--num_epochs=1", "--batch_size=32", "--train_examples=2048",
                       "--eval_examples=1000", "--parallel=jit"]


@pytest.fixture(scope="session")
def real_data_run(data_dir, tmp_path_factory):
    """The workdir and records of train.py's REAL_DATA_RUN_FLAGS on Fashion-MNIST, trained once per
    test run and read by the tests that use it, which are marked NEEDS_SHARED_FASHION_MNIST. It is
    compiled as users' runs are, without the suite's QUICK_COMPILE: it computes more than it
    compiles (65 s against 100 on 2 cores)."""
    import json

    with once_per_test_run(tmp_path_factory, "real_data_run") as (workdir, to_make):
        if to_make:
            result = run_on_cpu(["train.py", *REAL_DATA_RUN_FLAGS, f"--data_dir={data_dir}", f"--workdir={workdir}"],
                                timeout=600, env={**CPU_ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
            assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {"workdir": workdir, "records": records}


PRECIOUS = "a file of someone else's, outside the workdir\n"


@pytest.fixture
def precious(tmp_path):
    """A file that a planted link points at: it must come out as it went in."""
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_text(PRECIOUS)
    return path


# What stands where the project expects a regular file, and the messages it gets.
SPECIAL_FILES = {"fifo": "Is a FIFO, not a regular file", "socket": "Is a socket, not a regular file",
                 "device": "Is a character device, not a regular file", "directory": "Is a directory"}


def make_special_file(path, kind: str) -> None:
    """A FIFO, a socket, a device node (the twin of /dev/null, made in the test's own folder: root
    only) or a folder at `path`: none of them may be opened as a file, nor replaced by one."""
    import stat

    if kind == "directory":
        os.mkdir(path)
        return
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    mode, device = {"fifo": (stat.S_IFIFO, 0), "socket": (stat.S_IFSOCK, 0),
                    "device": (stat.S_IFCHR, os.makedev(1, 3))}[kind]
    os.mknod(path, mode | 0o600, device)


def returns_within(call, seconds: float = 10.0):
    """What `call()` returns or raises, in a thread; a failure of the test, not a hang, when it is
    still blocked after `seconds` (opening a FIFO that no one writes blocks until someone does)."""
    import threading

    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: B902 (handed to the test's thread)
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still blocked after {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# ---------------------------------------------------------------------------------------------
# Hooks.

def pytest_configure(config):
    config.addinivalue_line("markers", "accelerator: runs only where JAX finds a GPU or TPU (tests/test_accelerator.py)")


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker more than the cores, because a worker often waits (on a process it started,
    on a fixture another worker makes, on a deadline) and the spare one fills that core
    (docs/performance.md measures it)."""
    return (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(config, items):
    accelerator_items = [item for item in items if "accelerator" in item.keywords]
    if not accelerator_items:
        return
    from accelerator import accelerator_platform

    platform = accelerator_platform()
    if platform is None:
        skip = pytest.mark.skip(reason="no accelerator: JAX finds only a CPU on this machine")
        for item in accelerator_items:
            item.add_marker(skip)
