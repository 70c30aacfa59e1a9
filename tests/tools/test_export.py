"""`python -m nin_jax.export`: a trained NiN as one file that a process with JAX alone runs."""

import importlib.metadata
import os
import subprocess
import sys

import numpy as np
import pytest

from nin_jax.data import dataset
from nin_jax.tools import export, predict
from nin_jax import input_pipeline

from conftest import CPU_ENV, HELPER, REPO_ROOT, SPECIAL_FILES, fake_fashion_mnist, make_special_file

EXPORT_EXAMPLES = 256
NUM_IMAGES = 64
# What a user who installed only jax, numpy and flatbuffers runs (the module's docstring shows it), and the
# packages it must not have needed.
LOADER = """
import sys
import numpy as np
from jax import export

with open(sys.argv[1], "rb") as f:
    classify = export.deserialize(bytearray(f.read()))
images = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(classify.call(images)))
np.save(sys.argv[4], np.asarray(classify.call(images[:5])))  # any batch size
loaded = {name.split(".")[0] for name in sys.modules} & {"flax", "optax", "orbax", "chex", "nin_jax", "tensorflow"}
print(",".join(classify.platforms), sorted(loaded))
"""


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A short run with batch norm, whose moving statistics the exported file must carry too."""
    workdir = tmp_path_factory.mktemp("run")
    result = subprocess.run([sys.executable, HELPER, str(EXPORT_EXAMPLES),
                             "--resize=67", "--batch_size=32", "--num_epochs=1", "--eval_examples=64", "--batch_norm",
                             "--parallel=jit", f"--workdir={workdir}"],
                            capture_output=True, text=True, timeout=300, env=CPU_ENV)
    assert result.returncode == 0, result.stderr
    return workdir


def test_the_exported_file_gives_predicts_logits_in_a_process_with_jax_alone(trained_workdir, tmp_path):
    out = tmp_path / "nin.jax_exported"
    result = subprocess.run([sys.executable, "-m", "nin_jax.export", f"--workdir={trained_workdir}", f"--out={out}"],
                            capture_output=True, text=True, timeout=300, env=CPU_ENV, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}: uint8 images [B, 28, 28, 1] in, float32 logits [B, 10] out, "
                                    f"for cpu, cuda, tpu; classes 0 to 9: t-shirt, "), result.stdout

    config, variables = predict.restore_variables(str(trained_workdir))
    with fake_fashion_mnist(EXPORT_EXAMPLES):
        test = dataset.load_datasets(config)["test"].take(NUM_IMAGES)
    expected = predict.predict_logits(config, variables, test, config.batch_size)
    np.save(tmp_path / "images.npy", test.images)

    loader = tmp_path / "loader.py"
    loader.write_text(LOADER)
    result = subprocess.run([sys.executable, str(loader), str(out), str(tmp_path / "images.npy"),
                             str(tmp_path / "logits.npy"), str(tmp_path / "logits5.npy")],
                            capture_output=True, text=True, timeout=120, env=CPU_ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cpu,cuda,tpu []"
    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == (NUM_IMAGES, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert (logits.argmax(-1) == expected.argmax(-1)).all()
    np.testing.assert_allclose(np.load(tmp_path / "logits5.npy"), logits[:5], rtol=1e-5, atol=1e-5)


def loading_needs_in_words() -> str:
    """`export.LOADING_NEEDS` as the docs write it: `jax`, `numpy` and `flatbuffers`."""
    names = [f"`{name}`" for name in export.LOADING_NEEDS]
    return f"{', '.join(names[:-1])} and {names[-1]}"


def test_the_docs_name_exactly_what_loading_the_file_needs():
    with open(os.path.join(REPO_ROOT, "docs", "offline.md")) as f:
        page = " ".join(f.read().split())
    assert f"runs where only {loading_needs_in_words()} are installed" in page
    assert f"with only {loading_needs_in_words()} installed" in " ".join(export.__doc__.split())


@pytest.mark.slow
def test_the_exported_file_loads_in_a_fresh_environment_holding_only_what_the_docs_name(trained_workdir, tmp_path):
    """`pip install jax numpy flatbuffers` (at this environment's versions) and nothing else: what
    the docs tell a user who only wants to run the file."""
    out = tmp_path / "nin.jax_exported"
    result = subprocess.run([sys.executable, "-m", "nin_jax.export", f"--workdir={trained_workdir}", f"--out={out}"],
                            capture_output=True, text=True, timeout=300, env=CPU_ENV, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in export.LOADING_NEEDS]
    result = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", *pins],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    images = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, 28, 28, 1), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "loader.py").write_text(LOADER)
    result = subprocess.run([python, str(tmp_path / "loader.py"), str(out), str(tmp_path / "images.npy"),
                             str(tmp_path / "logits.npy"), str(tmp_path / "logits5.npy")],
                            capture_output=True, text=True, timeout=120, env=CPU_ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cpu,cuda,tpu []"
    config, variables = predict.restore_variables(str(trained_workdir))
    expected = predict.predict_logits(config, variables, input_pipeline.Split(images, np.zeros(NUM_IMAGES, np.int32)),
                                      config.batch_size)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, rtol=1e-5, atol=1e-5)


def test_export_refuses_what_it_cannot_do_in_one_line_and_writes_nothing(trained_workdir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    for argv, message in [
        ([f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'out'}"],
         f"--workdir {tmp_path / 'none'} does not exist; train a model there first"),
        ([f"--workdir={tmp_path / 'empty'}", f"--out={tmp_path / 'out'}"],
         f"{tmp_path / 'empty'} holds no trained model; train one first"),
        ([f"--workdir={trained_workdir}", f"--out={tmp_path / 'file' / 'out'}"],
         f"cannot write {tmp_path / 'file' / 'out'}: Not a directory"),
    ]:
        with pytest.raises(SystemExit) as exit_status:
            export.main(argv)
        assert exit_status.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith(f"python -m nin_jax.export: error: {message}") and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["empty", "file"]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_export_never_replaces_a_device_node_or_fifo_named_by_out(tmp_path, capsys, kind):
    """`--out /dev/null`, as root, had replaced the system's /dev/null with the model."""
    make_special_file(tmp_path / "out", kind)
    with pytest.raises(SystemExit) as exit_status:
        export.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}"])
    assert exit_status.value.code == 1
    assert capsys.readouterr().err == (f"python -m nin_jax.export: error: cannot write {tmp_path / 'out'}: "
                                       f"{SPECIAL_FILES[kind]}\n")
    assert not (tmp_path / "out").is_file() and os.listdir(tmp_path) == ["out"]
