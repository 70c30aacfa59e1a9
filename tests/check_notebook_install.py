"""The first cell of notebooks/nin.ipynb, where an older supported JAX is installed and nin_jax is
not (as on Colab): it must install nin_jax and leave JAX, jaxlib, numpy and TensorFlow as they were.
`.ci/run` runs it in its oldest-versions environment, from the notebooks/ folder:

    cd notebooks && python ../tests/check_notebook_install.py
"""

import importlib.metadata
import importlib.util
import json
import os

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "notebooks", "nin.ipynb")
KEPT = ("jax", "jaxlib", "numpy", "tensorflow-cpu")


def versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in KEPT}


if __name__ == "__main__":
    assert importlib.util.find_spec("nin_jax") is None, "nin_jax is installed already: nothing to check"
    with open(NOTEBOOK) as f:
        cells = [cell for cell in json.load(f)["cells"] if cell["cell_type"] == "code"]
    before = versions()
    exec(compile("".join(cells[0]["source"]), "the notebook's install cell", "exec"), {})
    after = versions()
    assert after == before, f"the install cell changed {before} into {after}"
    assert importlib.util.find_spec("nin_jax") is not None, "the install cell did not install nin_jax"
    print("the notebook's install cell installed nin_jax and kept " +
          ", ".join(f"{name} {version}" for name, version in after.items()))
