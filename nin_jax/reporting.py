"""What a run tells its user: the book's per-epoch line and a machine-readable log, and the
run's configuration for the tools that read the workdir later (`nin_jax.predict`)."""

import dataclasses
import json
import os
from typing import Any, Optional

from nin_jax.config import Config

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def epoch_line(record: dict[str, Any], num_epochs: int) -> str:
    """The book's `train_ch6` summary for one epoch, e.g.
    'epoch 3/10: loss 0.563, train acc 0.786, test acc 0.790, 3087.6 examples/sec on 2 cpu devices'."""
    return (
        f"epoch {record['epoch']}/{num_epochs}: loss {record['train_loss']:.3f}, "
        f"train acc {record['train_accuracy']:.3f}, test acc {record['test_accuracy']:.3f}, "
        f"{record['examples_per_sec']:.1f} examples/sec on {record['devices']}"
    )


def append_metrics(workdir: Optional[str], record: dict[str, Any]) -> None:
    """Appends one JSON object per epoch to <workdir>/metrics.jsonl."""
    if workdir:
        with open(os.path.join(workdir, METRICS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")


def keep_epochs(workdir: str, num_epochs: int) -> list[dict[str, Any]]:
    """Drops the records of epochs after `num_epochs` from metrics.jsonl and returns the rest. A
    resumed run calls it with its checkpoint's finished epochs: the later ones run again and would
    otherwise be logged twice. The kept lines stay byte for byte as they were."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["epoch"] <= num_epochs]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)  # atomic: a kill leaves the old file or the new one
    return [json.loads(line) for line in kept]


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_config(workdir: Optional[str], config: Config) -> None:
    """Writes <workdir>/config.json: every Config field, as the flags of train.py name them."""
    if workdir:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            json.dump(dataclasses.asdict(config), f, indent=2)


def read_config(workdir: str) -> Config:
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
        return Config(**json.load(f))
