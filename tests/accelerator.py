"""Finds the machine's accelerator for tests/test_accelerator.py, and runs code on it.

The suite pins JAX to the CPU (conftest.py) before JAX starts, so the accelerator is only seen from
processes started without that pin.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys
from typing import Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_TIMEOUT_S = 120
# Set to `cpu`, the CPU stands in for the accelerator: the tests run where there is none (CI).
STAND_IN = "NIN_JAX_ACCELERATOR_STAND_IN"


def unpinned_env(**overrides: str) -> dict[str, str]:
    """This process's environment without the CPU pin and the fake CPU devices. Where the CPU stands
    in, it compiles as the rest of the suite does (conftest's QUICK_COMPILE): with LLVM's
    optimizations, compiling these checks' steps took most of their time (docs/performance.md)."""
    env = {name: value for name, value in os.environ.items() if name not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    if os.environ.get(STAND_IN) == "cpu":
        from conftest import QUICK_COMPILE

        env["XLA_FLAGS"] = QUICK_COMPILE
    return {**env, "PYTHONPATH": REPO_ROOT, "PYTHONUNBUFFERED": "1", **overrides}


def run_python(args: list[str], env: dict[str, str], timeout: int = 300) -> str:
    """Runs Python with `args` in the repository root; returns its output, asserting it succeeded."""
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def run_code(code: str, env: dict[str, str], timeout: int = 300):
    """Runs `code` in a fresh Python; returns the JSON value it prints last."""
    return json.loads(run_python(["-c", code], env, timeout).strip().splitlines()[-1])


@functools.cache
def accelerator_platform() -> Optional[str]:
    """'gpu' or 'tpu' where JAX, unpinned, computes on one; None where it finds only a CPU, unless
    the CPU stands in ($NIN_JAX_ACCELERATOR_STAND_IN=cpu). JAX reaches accelerators through plugins
    (jax_plugins.*, libtpu): without one, no process runs."""
    if os.environ.get(STAND_IN) == "cpu":
        return "cpu"
    if not any(importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu")):
        return None
    try:
        platform = run_code("import jax, json; print(json.dumps(jax.default_backend()))", unpinned_env(),
                            PROBE_TIMEOUT_S)
    except (AssertionError, subprocess.TimeoutExpired):  # a plugin without its device or driver
        return None
    return None if platform == "cpu" else platform
