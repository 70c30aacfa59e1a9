"""The first cell of notebooks/nin.ipynb, where an older supported JAX is installed and nin_jax is
not (as on Colab): it must install nin_jax and leave JAX, jaxlib, numpy and TensorFlow as they were.
As on Colab, whose second package folder holds other versions of some distributions, a second
copy of `absl-py` at another version lies further along the path. `.ci/run` runs it in its
oldest-versions environment, from the notebooks/ folder:

    cd notebooks && python ../tests/check_notebook_install.py
"""

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from typing import Iterator

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "notebooks", "nin.ipynb")
KEPT = ("jax", "jaxlib", "numpy", "tensorflow-cpu")
SECOND_COPY = "absl-py"  # TensorFlow installs it, and optax, which the cell adds, needs it


def versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in KEPT}


@contextlib.contextmanager
def a_second_copy() -> Iterator[None]:
    """`SECOND_COPY` at a version other than the installed one, in a folder after the environment's
    own packages on the path of every Python process, as a site folder is (a .pth file)."""
    installed = importlib.metadata.version(SECOND_COPY)
    other = "2.1.0" if installed != "2.1.0" else "2.0.0"
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", folder,
                        f"{SECOND_COPY}=={other}"], check=True)
        pth = os.path.join(sysconfig.get_paths()["purelib"], "second_copy_for_the_check.pth")
        with open(pth, "w") as f:
            f.write(folder + "\n")
        sys.path.append(folder)
        try:
            found = {d.version for d in importlib.metadata.distributions() if d.metadata["Name"] == SECOND_COPY}
            assert found == {installed, other}, found
            yield
        finally:
            os.remove(pth)
            sys.path.remove(folder)


if __name__ == "__main__":
    assert importlib.util.find_spec("nin_jax") is None, "nin_jax is installed already: nothing to check"
    with open(NOTEBOOK) as f:
        cells = [cell for cell in json.load(f)["cells"] if cell["cell_type"] == "code"]
    before = versions()
    with a_second_copy():
        exec(compile("".join(cells[0]["source"]), "the notebook's install cell", "exec"), {})
    after = versions()
    assert after == before, f"the install cell changed {before} into {after}"
    assert importlib.util.find_spec("nin_jax") is not None, "the install cell did not install nin_jax"
    print("the notebook's install cell installed nin_jax and kept " +
          ", ".join(f"{name} {version}" for name, version in after.items()))
