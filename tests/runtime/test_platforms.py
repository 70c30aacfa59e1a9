"""A GPU or TPU plugin installed where its device is not (nin_jax/runtime/platforms.py): every
command says so in one line and runs on the CPU."""

import re
import subprocess
import sys

import pytest

from conftest import CPU_ENV, REPO_ROOT, command_line


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


# Beside the commands of conftest.command_line, what a user types first.
FIRST_COMMANDS = {"summary": ["train.py", "--summary", "--resize=67"], "import": ["-c", "import nin_jax.models"],
                  "plan_help": ["-m", "nin_jax.plan", "--help"]}


@pytest.mark.skipif(not _plugins_without_their_devices(),
                    reason="needs jax's CUDA plugin or libtpu installed on a machine without a GPU or TPU ('.[plan]')")
@pytest.mark.parametrize("command", ["summary", "import", "plan_help", "train", "export", "predict", "plan_local"])
def test_a_plugin_that_finds_no_device_is_kept_quiet_and_the_command_runs_on_the_cpu(command, trained, arrays, tmp_path):
    """With the test extras on a machine without a GPU, every command, and `import nin_jax.models`,
    printed JAX's 'Jax plugin configuration error' with a 10 to 20-line traceback and libtpu's
    `E0000` lines (and then a line of nin_jax's own). Importing nin_jax now keeps JAX off those
    plugins before it starts. The suite pins JAX to the CPU; these processes run without the pin,
    as a user's would."""
    from accelerator import unpinned_env

    args = FIRST_COMMANDS.get(command) or command_line(command, trained, tmp_path, arrays)
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=unpinned_env(),
                            cwd=REPO_ROOT)
    output = result.stdout + result.stderr
    for noise in ("Traceback", "E0000", "WARNING", "plugin configuration error", "finds no"):
        assert noise not in output or command == "plan_local", output
    if command == "plan_local":  # it plans for the accelerator attached here: there is none
        assert result.returncode == 1, result.stderr
        found_nothing = r"(jax's CUDA plugin finds no NVIDIA GPU|libtpu finds no TPU)( and libtpu finds no TPU)? here"
        assert re.fullmatch(rf"python -m nin_jax.plan: error: --target local plans for the GPU or TPU attached here, "
                            rf"and {found_nothing}; plan for a listed target instead \(--list\), or for this CPU with "
                            rf"JAX_PLATFORMS=cpu\n", result.stderr)
        return
    assert result.returncode == 0, result.stderr
    if command in ("train", "export", "predict", "import"):
        assert result.stderr == "", result.stderr
    if command == "train":
        assert "on 1 cpu device" in result.stdout


@pytest.mark.parametrize("platforms, line", [
    ("gpu", "JAX_PLATFORMS=gpu names gpu, and this machine has no NVIDIA GPU; unset JAX_PLATFORMS, or name the "
            "platforms this machine has, such as cpu"),
    ("cpu,tpu", "JAX_PLATFORMS=cpu,tpu names tpu, and this machine has no TPU; unset JAX_PLATFORMS, or name the "
                "platforms this machine has, such as cpu"),
    ("nosuch", r"JAX_PLATFORMS=nosuch names a platform that JAX cannot start here \(Unable to initialize backend "
               r"'nosuch': .*\); unset JAX_PLATFORMS, or name the platforms this machine has, such as cpu"),
])
def test_jax_platforms_naming_a_platform_this_machine_lacks_is_one_line(arrays, tmp_path, platforms, line):
    """A traceback of 47 lines for gpu; for tpu, libtpu's lines and a traceback of 49."""
    from nin_jax.runtime.platforms import has_devices

    if any(name in platforms and has_devices(platform) for name, platform in (("gpu", "cuda"), ("tpu", "tpu"))):
        pytest.skip("this machine has the platform")
    result = subprocess.run([sys.executable, *command_line("train", None, tmp_path, arrays)], capture_output=True,
                            text=True, timeout=120, env={**CPU_ENV, "JAX_PLATFORMS": platforms}, cwd=REPO_ROOT)
    assert result.returncode == 1, result.stderr
    assert re.fullmatch(f"train.py: error: {line}\n", result.stderr), result.stderr
    assert not (tmp_path / "run").exists()
