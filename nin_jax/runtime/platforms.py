"""Which of JAX's platforms a command starts.

JAX starts every GPU or TPU plugin that is installed, and one that finds no device says so at
length on every start: jax's CUDA plugin with a traceback (`cuInit(0) failed ... error 303`),
libtpu with a dozen lines of its own. `pip install -e '.[plan]'` installs both, on any laptop.
So, unless JAX_PLATFORMS (or jax.config) names the platforms, a command starts only those whose
devices the machine has, as JAX's own checks find them, and says in one line which plugins found
nothing when it computes on the CPU. Call it before JAX starts its backends.
"""

import importlib.util
import sys
from typing import Optional

# platform: (its plugin's modules, what the user installed, what the plugin looks for)
PLUGINS = {
    "cuda": (("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"), "jax's CUDA plugin", "NVIDIA GPU"),
    "tpu": (("libtpu",), "libtpu", "TPU"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


def _has_devices(platform: str) -> bool:
    from jax._src import hardware_utils  # what JAX itself looks at before it starts a backend

    if platform == "cuda":
        return hardware_utils.has_visible_nvidia_gpu()
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def skip_absent_accelerators(prog: str, say: bool = True) -> Optional[str]:
    """Keeps JAX off the installed GPU and TPU plugins that find no device here. When that leaves
    the CPU alone, returns which plugins found nothing and, with `say`, prints one line on stderr
    that says so."""
    import jax

    if jax.config.jax_platforms:  # the user chose (JAX_PLATFORMS)
        return None
    installed = [platform for platform, (modules, _, _) in PLUGINS.items() if any(map(_installed, modules))]
    absent = [platform for platform in installed if not _has_devices(platform)]
    if not absent:
        return None
    present = [platform for platform in installed if platform not in absent]
    jax.config.update("jax_platforms", ",".join([*present, "cpu"]))
    if present:  # the GPU or TPU computes; a plugin with nothing to drive is no news
        return None
    found_nothing = " and ".join(f"{PLUGINS[platform][1]} finds no {PLUGINS[platform][2]}" for platform in absent)
    if say:
        print(f"{prog}: {found_nothing} here; running on the CPU (set JAX_PLATFORMS=cpu to skip this check and "
              f"this line)", file=sys.stderr, flush=True)
    return found_nothing
