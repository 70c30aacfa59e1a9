"""`python -m nin_jax.export`: a trained NiN as one file that a process with JAX alone runs."""

import os
import subprocess
import sys

import numpy as np
import pytest

from nin_jax import dataset, export, predict

from conftest import REPO_ROOT, fake_fashion_mnist

NUM_EXAMPLES = 256
NUM_IMAGES = 64
CPU_ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
# What a user who installed only jax and numpy runs (the module's docstring shows it), and the
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
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests", "fake_data_train.py"), str(NUM_EXAMPLES),
                             "--resize=67", "--batch_size=32", "--num_epochs=1", "--eval_examples=64", "--batch_norm",
                             "--parallel=jit", "--compile_cache=off", f"--workdir={workdir}"],
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
    with fake_fashion_mnist(NUM_EXAMPLES):
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


def test_export_refuses_what_it_cannot_do_in_one_line_and_writes_nothing(trained_workdir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for argv, message in [
        ([f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'out'}"],
         f"{tmp_path / 'none'} holds no trained model; train one first"),
        ([f"--workdir={trained_workdir}", f"--out={tmp_path / 'file' / 'out'}"],
         f"cannot write {tmp_path / 'file' / 'out'}: Not a directory"),
    ]:
        with pytest.raises(SystemExit) as exit_status:
            export.main(argv)
        assert exit_status.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith(f"python -m nin_jax.export: error: {message}") and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["file"]
