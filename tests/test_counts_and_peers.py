"""Every count a user types that sizes memory is bounded before anything is allocated, and a job
whose processes never all arrive, or whose coordinator address is malformed, ends in one line."""

import os
import resource
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT
from test_multiprocess import HELPER, free_loopback_port

CPU_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
SMALL_JOB = ["--resize=67", "--batch_size=8", "--num_epochs=1", "--train_examples=16", "--eval_examples=8",
             "--compile_cache=off"]
MEMORY_LIMIT = 4 * 2**30  # address space of a process that must refuse at once: a test that fails fails fast
PEER_TIMEOUT_S = 5


def limited_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run(args, timeout=60, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=CPU_ENV,
                          cwd=REPO_ROOT, **kwargs)


@pytest.mark.parametrize("flag, value, message", [
    ("--devices", "1000000000", "--devices must be from 1 to 16 (the GPUs of one host), got 1000000000"),
    ("--batch_size", "1000000000", "--batch_size must be from 1 to 65,536, got 1000000000"),
    ("--resize", "100000", "--resize must be from 67 to 1,024 (NiN's pools need at least 67), got 100000"),
])
def test_a_count_that_would_fill_the_memory_is_refused_before_anything_is_allocated(flag, value, message):
    """`--target h100 --devices 1000000000` grew to 20 GB and was killed by the kernel, in silence."""
    result = run(["-m", "nin_jax.plan", "--target", "h100", flag, value], preexec_fn=limited_memory)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == f"python -m nin_jax.plan: error: {message} (see --help)\n"


@pytest.mark.parametrize("flags, message", [
    (["--batch_size=1000000000"], "--batch_size must be from 1 to 65,536, got 1000000000"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=1000000000"],
     "--num_processes must be from 1 to 100,000, got 1000000000"),
    (["--peer_timeout_seconds=100000000000"], "--peer_timeout_seconds must be from 1 to 86,400 (a day), got 100000000000"),
    (["--coordinator_address=localhost", "--num_processes=2"],
     "--coordinator_address localhost is not host:port (such as 10.0.0.1:1234 or [fe80::1]:1234)"),
    (["--coordinator_address=localhost:abc", "--num_processes=2"],
     "--coordinator_address localhost:abc is not host:port (such as 10.0.0.1:1234 or [fe80::1]:1234)"),
    (["--coordinator_address=127.0.0.1:99999", "--num_processes=2"],
     "--coordinator_address 127.0.0.1:99999: the port must be from 1 to 65535"),
    (["--coordinator_address=a b:1234", "--num_processes=2"],
     "--coordinator_address a b:1234 is not host:port (such as 10.0.0.1:1234 or [fe80::1]:1234)"),
])
def test_train_refuses_such_counts_and_a_malformed_coordinator_address_in_one_line(flags, message):
    start = time.monotonic()
    result = run([HELPER, "64", *SMALL_JOB, *flags], preexec_fn=limited_memory)
    assert time.monotonic() - start < 30
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"fake_data_train.py: error: {message} (see --help)\n"


def test_an_unknown_coordinator_host_is_one_line():
    result = run([HELPER, "64", *SMALL_JOB, "--coordinator_address=no-such-host.invalid:1234", "--num_processes=2"])
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("fake_data_train.py: error: --coordinator_address no-such-host.invalid:1234: "
                                    "cannot find the host no-such-host.invalid ("), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_whose_peers_never_arrive_ends_in_one_line_within_the_peer_timeout(rank, tmp_path):
    """Process 0 of a job of 2 whose process 1 never starts waited 307 s, then the runtime aborted
    with a C++ stack trace (status 134); process 1 without its coordinator did the same."""
    address = f"127.0.0.1:{free_loopback_port()}"
    start = time.monotonic()
    result = run([HELPER, "64", *SMALL_JOB, f"--workdir={tmp_path}/run", f"--coordinator_address={address}",
                  "--num_processes=2", f"--process_id={rank}", f"--peer_timeout_seconds={PEER_TIMEOUT_S}"],
                 timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        f"fake_data_train.py: error: not all 2 processes of this job reached the coordinator at {address} within "
        f"{PEER_TIMEOUT_S} s (--peer_timeout_seconds); start every process, process 0 first, within that time of "
        f"each other, or raise --peer_timeout_seconds\n")
    assert elapsed < PEER_TIMEOUT_S + 30, elapsed  # the interpreter's start and imports, then the wait
