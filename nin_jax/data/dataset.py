"""Fashion-MNIST for a run: built by tensorflow-datasets from the four original files (one build
per data dir at a time, under a lock, after checking the files' checksums), or read from
`--data_arrays`. After the first read, the copy beside the build (`nin_jax.data_arrays`) is read
instead, without TensorFlow.
"""

import contextlib
import hashlib
import io
import os
import socket
import sys
import time
import urllib.parse
from typing import Iterator, Optional

import numpy as np

from nin_jax.data import data_arrays
from nin_jax.runtime import commands, locks
from nin_jax.runtime.errors import DataError
from nin_jax.input_pipeline import DATASET, SOURCE_FILES, SPLITS, Split

REACH_TIMEOUT_S = 10.0  # for each server of the four files, before --download gives up on the network

def _default_data_dir() -> str:
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _missing_files(folder: str) -> list[str]:
    return [name for name in SOURCE_FILES if not os.path.isfile(os.path.join(folder, name))]


def import_tensorflow():
    """TensorFlow, for tfds only: quiet, and kept off the GPU memory that JAX needs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # also silences TF's start-up banner
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    return tf


def _import_tfds():
    """tfds builds and reads with TensorFlow, which must be imported the quiet way first."""
    import_tensorflow()
    import tensorflow_datasets as tfds

    return tfds


def load_fashion_mnist(data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                       download: bool = False) -> dict[str, Split]:
    """Loads {'train', 'test'}, building the tfds dataset first if this data_dir lacks it.

    After the first read, an uncompressed copy beside the build (`nin_jax.data_arrays`) is read
    instead, without TensorFlow, for as long as the build is unchanged.

    The four original files are taken from `manual_dir`, else from tfds' default manual folder
    (`<data_dir>/downloads/manual`). Only with `download=True` may tfds fetch them from the
    internet; offline, its retries would take minutes before failing.
    """
    data_dir = os.path.expanduser(data_dir) if data_dir else _default_data_dir()
    dataset_dir = os.path.join(data_dir, DATASET)
    copy = data_arrays.read_copy(dataset_dir)
    if copy:
        return copy
    tfds = _import_tfds()
    if not sys.stderr.isatty():  # in a log file, tfds' bars would be a hundred lines: phases are said below
        tfds.disable_progress_bar()
    if not tfds.builder(DATASET, data_dir=data_dir).is_prepared():
        with _build_lock(data_dir):
            builder = tfds.builder(DATASET, data_dir=data_dir)
            if not builder.is_prepared():  # else another process has built it meanwhile
                _build_from_files(tfds, builder, data_dir, manual_dir, download)
    datasets = _read_build(tfds.builder(DATASET, data_dir=data_dir), data_dir, dataset_dir)
    problem = data_arrays.what_is_wrong(datasets)
    if problem:
        raise DataError(f"the Fashion-MNIST that tfds built in {data_dir} is not what it should be: {problem}; "
                        f"move {dataset_dir} away and run again to build it anew")
    data_arrays.save_copy(dataset_dir, data_arrays.as_arrays(datasets))
    return datasets


def _say(line: str) -> None:
    """A line about the dataset on stderr, named by the command, above any progress bar."""
    print(f"{commands.program_name()}: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _build_lock(data_dir: str) -> Iterator[None]:
    """One build per data_dir at a time: two builds into one folder would collide (tfds renames its
    finished build into place, and the second rename fails). Whoever finds the lock taken says so
    and waits for the build to end."""
    def wait(holder: str) -> None:
        print(f"waiting for {holder}, which is building Fashion-MNIST in {data_dir}", file=sys.stderr, flush=True)

    with contextlib.ExitStack() as stack:
        try:
            os.makedirs(data_dir, exist_ok=True)
            stack.enter_context(locks.exclusive(os.path.join(data_dir, f"{DATASET}.lock"), wait))
        except locks.Unsupported as error:
            commands.warn(f"cannot lock --data_dir {data_dir} ({error.strerror}); two builds there at once would collide")
        except OSError as error:
            raise DataError(f"cannot write to --data_dir {data_dir} to build Fashion-MNIST there: "
                            f"{error.strerror or error}") from error
        yield


def _build_from_files(tfds, builder, data_dir: str, manual_dir: Optional[str], download: bool) -> None:
    """Builds the tfds dataset from the four files in `manual_dir`, else downloads them when allowed."""
    default_manual_dir = os.path.join(data_dir, "downloads", "manual")
    manual_dir = os.path.expanduser(manual_dir) if manual_dir else default_manual_dir
    missing = _missing_files(manual_dir)
    if missing and not download:
        raise DataError(
            f"Fashion-MNIST is not built in {data_dir} and {manual_dir} lacks {', '.join(missing)}. "
            f"Put the four files {', '.join(SOURCE_FILES)} into {default_manual_dir} "
            f"or into a folder named by --manual_dir, or pass --download when online."
        )
    if missing:
        _check_reachable(builder, default_manual_dir)
    else:
        _check_source_files(builder, manual_dir)
    start = time.monotonic()
    _say(f"building Fashion-MNIST in {os.path.join(data_dir, DATASET)} (once, about 140 MB; "
         f"--data_dir puts it elsewhere)")
    _build(builder, tfds.download.DownloadConfig(manual_dir=manual_dir))
    _say(f"built Fashion-MNIST in {time.monotonic() - start:.0f} s")


def _check_reachable(builder, default_manual_dir: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Refuses `--download` at once where the servers of the four files cannot be reached: tfds'
    own retries would take minutes before they fail."""
    servers = {(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
               for parts in map(urllib.parse.urlsplit, builder.url_infos)}  # the four files share one
    for host, port in sorted(servers):
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
        except OSError as error:
            raise DataError(
                f"--download cannot reach {host} ({error.strerror or error}): the network is down or "
                f"blocked here. Put the four files {', '.join(SOURCE_FILES)} into {default_manual_dir} or into a "
                f"folder named by --manual_dir and run again without --download"
            ) from error


def load_datasets(config) -> dict[str, Split]:
    """{'train', 'test'} as the config says: from an exported .npz (`--data_arrays`), else from tfds."""
    if config.data_arrays:
        return data_arrays.load(config.data_arrays)
    return load_fashion_mnist(config.data_dir, config.manual_dir, config.download)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _check_source_files(builder, manual_dir: str) -> None:
    """Compares the four files with the sizes and SHA-256 sums that tfds registers for them. tfds
    checks them too, but its error speaks of a download and spans several lines."""
    published = {info.filename: info for info in builder.url_infos.values()}
    damaged = []
    for name in SOURCE_FILES:
        path = os.path.join(manual_dir, name)
        if _sha256(path) != published[name].checksum:
            damaged.append(f"{path} ({os.path.getsize(path):,} bytes, the original has {int(published[name].size):,})")
    if damaged:
        one = len(damaged) == 1
        raise DataError(
            f"{'a' if one else len(damaged)} Fashion-MNIST file{'' if one else 's'} damaged or altered, with another "
            f"SHA-256 than the published one: {'; '.join(damaged)}. Replace {'it' if one else 'them'} with the "
            f"original{'' if one else 's'} and run again."
        )


def _build(builder, download_config) -> None:
    """Runs tfds' build; a downloaded file with the wrong checksum ends in a one-line DataError.
    tfds' own two lines on stdout ('Downloading and preparing dataset Unknown size ...') are left
    out: the build's lines say where it goes and how long it took."""
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(download_config=download_config)
    except NonMatchingChecksumError as error:
        raise DataError(f"a downloaded Fashion-MNIST file is damaged: {' '.join(str(error).split())}") from error


def _read_build(builder, data_dir: str, dataset_dir: str) -> dict[str, Split]:
    """Both splits of the build; a damaged record (a full disk, a copy cut short) is a DataError
    that says what to move away, not TensorFlow's traceback."""
    tf = import_tensorflow()
    try:
        return {split: _read_split(builder, split) for split in SPLITS}
    except tf.errors.OpError as error:
        cause = " ".join(error.message.split())
        raise DataError(f"the Fashion-MNIST that tfds built in {data_dir} cannot be read ({cause}); "
                        f"move {dataset_dir} away and run again to build it anew") from error


def _read_split(builder, split: str, chunk: int = 10_000) -> Split:
    import tensorflow_datasets as tfds

    chunks = list(tfds.as_numpy(builder.as_dataset(split=split, batch_size=chunk)))
    return Split(
        np.concatenate([c["image"] for c in chunks]).astype(np.uint8),
        np.concatenate([c["label"] for c in chunks]).astype(np.int32),
    )
