"""notebooks/nin.ipynb runs from top to bottom, offline, on the real Fashion-MNIST files in ../shared.

It runs at its "smoke" budget, chosen through NIN_NOTEBOOK_BUDGET, so the committed notebook keeps
its real budget and the outputs of a real run."""

import inspect
import os

import nbclient
import nbformat

from nin_jax import models

from conftest import NEEDS_SHARED_FASHION_MNIST, REPO_ROOT, SHARED_FASHION_MNIST, xla_flags

NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "nin.ipynb")



@NEEDS_SHARED_FASHION_MNIST
def test_notebook_runs_offline_at_a_small_budget(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("NIN_NOTEBOOK_BUDGET", "smoke")
    monkeypatch.setenv("NIN_MANUAL_DIR", os.path.abspath(SHARED_FASHION_MNIST))
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)  # the suite's build of the dataset, not one in ~
    monkeypatch.setenv("PYTHONPATH", REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))  # this checkout's nin_jax
    monkeypatch.setenv("XLA_FLAGS", xla_flags())  # one CPU device, as on a reader's machine, not the tests' four
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, when a cell raises

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs)
    assert "total                                    1,992,166" in text  # the layer summary
    source = inspect.getsource(models.NiNBlock) + "\n\n" + inspect.getsource(models.NiN)
    assert any(output.get("data", {}).get("text/plain", "").strip() == source.strip()  # the two classes, as they are
               for output in outputs)
    assert "the 'smoke' budget" in text
    assert "epoch 2/2: loss " in text
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 2  # curves and predictions
    assert (tmp_path / "runs" / "notebook_smoke" / "predictions.png").is_file()


def test_the_committed_notebook_keeps_its_real_budget_and_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    source = "".join(cell.source for cell in notebook.cells)
    assert 'os.environ.get("NIN_NOTEBOOK_BUDGET", "cpu" if jax.default_backend() == "cpu" else "accelerator")' in source
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 2, "commit the notebook executed"
    assert "epoch 5/5: loss " in "".join(output.get("text", "") for output in outputs)
    assert os.path.getsize(NOTEBOOK) < 1_000_000
