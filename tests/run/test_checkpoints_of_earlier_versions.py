"""Checkpoints written before the package was laid out anew (commit 4b9aa39) resume on today's code:
their arrays have today's names, shapes and dtypes, and a run that an earlier version saved goes on
here to exactly where an uninterrupted run of today's code ends."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization

from nin_jax import steps, trainer
from nin_jax.config import Config
from nin_jax.data import data_arrays
from nin_jax.input_pipeline import Split
from nin_jax.run.checkpoints import Checkpoints, Snapshot

from conftest import REPO_ROOT

EARLIER = "4b9aa39"  # the last commit before the layout of ops/, run/, runtime/, data/ and tools/
MANIFEST = os.path.join(REPO_ROOT, "tests", "run", f"checkpoints_{EARLIER}.json")
SMALL = dict(resize=67, num_epochs=1, train_examples=16, eval_examples=16, batch_size=8)


def manifest(step_folder: str) -> dict:
    """What a checkpoint holds, by name: each array's path, shape and dtype, and the run's record
    without its checksum."""
    arrays = ocp.StandardCheckpointer().restore(os.path.join(step_folder, "arrays"))
    with open(os.path.join(step_folder, "run", "metadata")) as f:
        run = json.load(f)
    run.pop("fingerprint")
    return {"arrays": {jax.tree_util.keystr(path): [list(np.shape(leaf)), str(np.asarray(leaf).dtype)]
                       for path, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]}, "run": run}


def small_data(path) -> str:
    rng = np.random.default_rng(0)
    splits = {split: Split(rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 16, dtype=np.int32))
              for split in ("train", "test")}
    data_arrays.save(splits, str(path))
    return str(path)


@pytest.mark.parametrize("recipe", ["reference", "strong"])
def test_a_checkpoint_holds_the_arrays_and_record_of_an_earlier_versions(recipe, tmp_path):
    """The arrays of the reference recipe (parameters) and of the strong one (batch statistics,
    momentum) under the names, shapes and dtypes that 4b9aa39 wrote (tests/run holds its manifest)."""
    config = Config.from_recipe(recipe, **SMALL)
    with Checkpoints(str(tmp_path), config) as checkpoints:
        checkpoints.save(Snapshot.start(jax.device_get(steps.create_train_state(config))))
    with open(MANIFEST) as f:
        earlier = json.load(f)[recipe]
    assert manifest(str(tmp_path / "checkpoints" / "0")) == earlier


def has_earlier_commit() -> bool:
    return subprocess.run(["git", "-C", REPO_ROOT, "cat-file", "-e", f"{EARLIER}^{{commit}}"],
                          capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not has_earlier_commit(), reason=f"needs the repository's history: commit {EARLIER} "
                                                     f"(a shallow clone lacks it)")
def test_a_run_that_an_earlier_version_saved_resumes_here_exactly(tmp_path):
    """Parameters and momentum (a constant learning rate, so that the run may go on past its first
    epochs): one epoch by 4b9aa39's train.py, a second by today's code, ends where two epochs of
    today's code end. Without batch norm, which is one multiply-add per element since 62980ba and
    rounds otherwise than 4b9aa39's; the test above checks its arrays' names, shapes and dtypes."""
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    archive = subprocess.run(["git", "-C", REPO_ROOT, "archive", EARLIER, "nin_jax", "train.py"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(earlier)], input=archive, check=True)
    data = small_data(tmp_path / "data.npz")
    flags = ["--momentum", "0.9", "--resize", "67", "--train_examples", "16", "--eval_examples", "16",
             "--batch_size", "8", "--data_arrays", data]
    resumed, uninterrupted = str(tmp_path / "resumed"), str(tmp_path / "uninterrupted")
    env = {**os.environ, "PYTHONPATH": str(earlier)}
    result = subprocess.run([sys.executable, "train.py", *flags, "--num_epochs", "1", "--workdir", resumed],
                            cwd=earlier, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    config = Config(**{**SMALL, "num_epochs": 2}, momentum=0.9, data_arrays=data)
    lines = []
    trainer.train_and_evaluate(config, resumed, log=lines.append)
    assert any(line.startswith("resuming from the checkpoint of step 2 ") for line in lines), lines
    trainer.train_and_evaluate(config, uninterrupted, log=lambda line: None)
    states = []
    for workdir in (resumed, uninterrupted):
        with Checkpoints(workdir, config) as checkpoints:
            states.append(checkpoints.restore_latest(steps.create_train_state(config, steps_per_epoch=2)).state)
    assert int(states[0].step) == int(states[1].step) == 4
    jax.tree_util.tree_map(np.testing.assert_array_equal, serialization.to_state_dict(states[0]),
                           serialization.to_state_dict(states[1]))
