"""The machine of a benchmarks/accelerator.sh run, and its refusal to measure anything else: the
versions, the devices and nvidia-smi's line as JSON; exits 1 with one line on stderr where JAX
cannot start or computes on another backend than the one asked for (a CUDA plugin that failed to
load would leave JAX on the CPU, and every figure of the run a CPU figure under a GPU heading).

    python benchmarks/accelerator_environment.py --backend gpu --out R/environment.json --command "..."
"""

import argparse
import datetime
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
from typing import Optional

PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu", "flax", "optax", "orbax-checkpoint",
            "numpy", "torch")


def version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> Optional[str]:
    """The GPUs as nvidia-smi names them, where it is installed."""
    if not shutil.which("nvidia-smi"):
        return None
    result = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30)
    return result.stdout.strip() or None


class PluginFailures(logging.Handler):
    """The first line of each failure that JAX logs as it starts its plugins: JAX then fails on
    its own terms (an AssertionError), and the plugin's reason is only in the log."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        cause = record.exc_info[1] if record.exc_info else None
        self.reasons.append((str(cause) if cause else record.getMessage()).strip().split("\n")[0])


def describe(backend: str, command: str) -> dict:
    """The environment as the summary shows it, once JAX computes on `backend`: or SystemExit."""
    failures = PluginFailures()
    logging.getLogger("jax").addHandler(failures)
    import jax

    try:
        found = jax.default_backend()
    except Exception as error:  # a plugin fails in its own way: RuntimeError, AssertionError, ...
        reason = "; ".join(failures.reasons) or f"{type(error).__name__}: {error}".strip().split("\n")[0]
        raise SystemExit(f"JAX cannot start JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')} ({reason})")
    if found != backend:
        raise SystemExit(f"JAX computes on {found}, not on the {backend} asked for")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0], "versions": {name: version(name) for name in PACKAGES},
            "backend": found, "jax_platforms": os.environ.get("JAX_PLATFORMS"),
            "devices": [str(device) for device in jax.devices()], "device_kind": jax.devices()[0].device_kind,
            "nvidia_smi": nvidia_smi(), "command": command}


def main(argv: Optional[list[str]] = None) -> int:
    """Writes the environment; or says in one line why JAX does not compute where it was asked to."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", required=True, choices=("gpu", "tpu", "cpu"),
                        help="the backend JAX must compute on (jax.default_backend())")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--command", default="", help="the command of the run, for the summary")
    args = parser.parse_args(argv)
    try:
        info = describe(args.backend, args.command)
    except SystemExit as refusal:
        print(f"accelerator_environment.py: {refusal}", file=sys.stderr)
        return 1
    with open(args.out, "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
