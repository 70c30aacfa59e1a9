"""Which of JAX's platforms nin_jax lets JAX start.

JAX starts every GPU or TPU plugin that is installed, and one that finds no device says so at
length on every start: jax's CUDA plugin with a traceback (`cuInit(0) failed ... error 303`),
libtpu with `E0000` lines of its own. `pip install -e '.[test]'` installs both (the plan's
compilers), on any laptop. So importing nin_jax, before JAX starts a backend, keeps JAX off the
installed plugins whose devices this machine lacks, as JAX's own checks find them
(`jax._src.hardware_utils`: NVIDIA's device files, the TPU's PCI ids), unless JAX_PLATFORMS or
`jax.config` names the platforms. Where a device is there, its plugin starts as ever, and a real
failure of it shows. This module imports nothing of JAX's, so that it runs before JAX does.
"""

import glob
import importlib.util
import os
import pathlib
import sys

# platform: (its plugin's modules, what the user installed, what the plugin looks for)
PLUGINS = {
    "cuda": (("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"), "jax's CUDA plugin", "NVIDIA GPU"),
    "tpu": (("libtpu",), "libtpu", "TPU"),
}
_NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")  # a GPU, in Docker, in WSL2
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")

# Which installed plugins found no device here, as a phrase, once `keep_off_absent_accelerators`
# has kept JAX off them ('' where none did).
found_nothing = ""


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


def has_devices(platform: str) -> bool:
    """Whether this machine has the devices of `platform` ('cuda' or 'tpu'), as JAX checks it."""
    if platform == "cuda":
        return any(os.path.exists(path) for path in _NVIDIA_DEVICE_FILES)
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        device = os.path.join(os.path.dirname(vendor), "device")
        if pathlib.Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR and \
                pathlib.Path(device).read_text().strip() in _TPU_PCI_DEVICES:
            return True
    return False


def _chosen_by_user() -> bool:
    if os.environ.get("JAX_PLATFORMS"):
        return True
    jax = sys.modules.get("jax")
    return bool(jax is not None and getattr(jax, "config", None) is not None and jax.config.jax_platforms)


def keep_off_absent_accelerators() -> str:
    """Keeps JAX off the installed GPU and TPU plugins that find no device here, unless the user
    chose the platforms; returns `found_nothing`, which says which did where the CPU is left alone."""
    global found_nothing
    if _chosen_by_user():
        return found_nothing
    plugins = [platform for platform, (modules, _, _) in PLUGINS.items() if any(map(installed, modules))]
    absent = [platform for platform in plugins if not has_devices(platform)]
    if not absent:
        return found_nothing
    present = [platform for platform in plugins if platform not in absent]
    platforms = ",".join([*present, "cpu"])
    if "jax" in sys.modules:  # imported already; it reads the setting when its backends start
        sys.modules["jax"].config.update("jax_platforms", platforms)
    else:
        os.environ["JAX_PLATFORMS"] = platforms
    if not present:  # the CPU alone computes
        found_nothing = " and ".join(f"{PLUGINS[platform][1]} finds no {PLUGINS[platform][2]}" for platform in absent)
    return found_nothing


def lacking() -> str:
    """Why JAX_PLATFORMS names a GPU or TPU that this machine lacks, or '': JAX would fail at its
    first use of it with a traceback (libtpu with lines of its own first). A `gpu` is AMD's too."""
    value = os.environ.get("JAX_PLATFORMS", "")
    for name in (name.strip() for name in value.split(",")):
        platform = {"cuda": "cuda", "gpu": "cuda", "tpu": "tpu"}.get(name)
        if platform and not has_devices(platform) and not (name == "gpu" and os.path.exists("/dev/kfd")):
            return (f"JAX_PLATFORMS={value} names {name}, and this machine has no {PLUGINS[platform][2]}; "
                    f"{_NAME_OTHERS}")
    return ""


_NAME_OTHERS = "unset JAX_PLATFORMS, or name the platforms this machine has, such as cpu"


def backend_failure(error: BaseException) -> str:
    """The line that says why JAX could not start a platform, for the RuntimeError that JAX raises
    at its first use of one (a name it does not know, a device that failed); '' for any other error."""
    text = str(error)
    if not isinstance(error, RuntimeError) or not text.startswith(("Unable to initialize backend", "Unknown backend")):
        return ""
    reason = text.split(" (set JAX_PLATFORMS=")[0].strip().rstrip(".")
    value = os.environ.get("JAX_PLATFORMS", "")
    if not value:
        return f"JAX cannot start its platform here ({reason})"
    return f"JAX_PLATFORMS={value} names a platform that JAX cannot start here ({reason}); {_NAME_OTHERS}"
