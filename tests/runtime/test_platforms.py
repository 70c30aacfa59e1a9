"""A GPU or TPU plugin installed where its device is not (nin_jax/runtime/platforms.py): every
command says so in one line and runs on the CPU."""

import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, command_line, prog


def _plugins_without_their_devices() -> bool:
    import importlib.util

    from jax._src import hardware_utils

    def installed(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:
            return False

    cuda = installed("jax_plugins.xla_cuda12") or installed("jax_plugins.xla_cuda13")
    return ((cuda or installed("libtpu")) and not hardware_utils.has_visible_nvidia_gpu()
            and not hardware_utils.num_available_tpu_chips_and_device_id()[0])


@pytest.mark.skipif(not _plugins_without_their_devices(),
                    reason="needs jax's CUDA plugin or libtpu installed on a machine without a GPU or TPU ('.[plan]')")
@pytest.mark.parametrize("command", ["train", "export", "predict", "plan_local"])
def test_a_plugin_that_finds_no_device_is_one_line_and_the_command_runs_on_the_cpu(command, trained, arrays, tmp_path):
    """With the '[plan]' extra on a machine without a GPU, every command printed JAX's 'Jax plugin
    configuration error' with a 10 to 20-line traceback, and libtpu's lines. The suite pins JAX to
    the CPU; these processes run without the pin, as a user's would."""
    from accelerator import unpinned_env

    result = subprocess.run([sys.executable, *command_line(command, trained, tmp_path, arrays)], capture_output=True,
                            text=True, timeout=300, env=unpinned_env(), cwd=REPO_ROOT)
    found_nothing = r"(jax's CUDA plugin finds no NVIDIA GPU|libtpu finds no TPU)( and libtpu finds no TPU)? here"
    if command == "plan_local":  # it plans for the accelerator attached here: there is none
        assert result.returncode == 1, result.stderr
        assert re.fullmatch(rf"python -m nin_jax.plan: error: --target local plans for the GPU or TPU attached here, "
                            rf"and {found_nothing}; plan for a listed target instead \(--list\), or for this CPU with "
                            rf"JAX_PLATFORMS=cpu\n", result.stderr)
        return
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"{re.escape(prog(command))}: {found_nothing}; running on the CPU \(set JAX_PLATFORMS=cpu "
                        rf"to skip this check and this line\)\n", result.stderr), result.stderr
    if command == "train":
        assert "on 1 cpu device" in result.stdout
