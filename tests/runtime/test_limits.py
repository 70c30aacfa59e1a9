"""The limits a command runs under (nin_jax/runtime/limits.py): an address space or a number of
threads too small for JAX's runtime is one line before JAX starts, instead of XLA's abort."""

import contextlib
import os
import resource
import uuid

import pytest

from conftest import command_line, prog, run_on_cpu

PIDS_CGROUPS = "/sys/fs/cgroup/pids"  # the cgroup (v1) controller that bounds a group's tasks, threads included


@pytest.mark.parametrize("command", ["train", "export", "predict"])
def test_an_address_space_too_small_for_jax_is_one_line_naming_the_figure_needed(trained, arrays, tmp_path, command):
    """`ulimit -v 3000000` aborted every command with a C++ stack trace (SIGABRT) from the thread
    that XLA's CPU client could not create; 4 GB gave a misleading 'out of memory' line."""
    def limit_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (3_000_000 * 1024, resource.RLIM_INFINITY))

    result = run_on_cpu(command_line(command, trained, tmp_path, arrays), timeout=120, preexec_fn=limit_address_space)
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    assert result.stderr == (f"{prog(command)}: error: the address space is limited to 2.9 GiB (ulimit -v 3000000), "
                             f"and JAX's runtime needs at least 6 GiB of it: raise the limit (ulimit -v unlimited)\n")
    assert sorted(os.listdir(tmp_path)) == []


@contextlib.contextmanager
def pids_cgroup(maximum: int):
    """A cgroup of its own whose tasks, threads included, may number `maximum` at most, as a
    container's `--pids-limit` sets it; root is held to it too."""
    if os.geteuid() != 0 or not os.access(PIDS_CGROUPS, os.W_OK):
        pytest.skip(f"a cgroup of one's own needs root and a writable {PIDS_CGROUPS}")
    folder = os.path.join(PIDS_CGROUPS, f"nin_jax_test_{uuid.uuid4().hex}")
    os.mkdir(folder)
    try:
        with open(os.path.join(folder, "pids.max"), "w") as limit:
            limit.write(str(maximum))
        yield folder
    finally:
        os.rmdir(folder)  # empty again: its one process has ended


@pytest.mark.parametrize("command", ["train", "export", "predict"])
def test_too_few_threads_for_jax_is_one_line_naming_the_number_needed(trained, arrays, tmp_path, command):
    """A container's limit of 20 tasks: XLA aborted with a C++ stack trace when it could not start
    the threads of its pools."""
    with pids_cgroup(20) as cgroup:
        def join_cgroup():
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
                procs.write(str(os.getpid()))

        result = run_on_cpu(command_line(command, trained, tmp_path, arrays), timeout=120, preexec_fn=join_cgroup)
    cores = len(os.sched_getaffinity(0))
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    assert result.stderr == (f"{prog(command)}: error: this process may start only 19 more threads (ulimit -u, or its "
                             f"cgroup's pids.max), and JAX's runtime needs {24 + 6 * cores} on {cores} cores: raise "
                             f"the limit, or end other processes of this user\n")
    assert sorted(os.listdir(tmp_path)) == []
