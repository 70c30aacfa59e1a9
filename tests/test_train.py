"""The command line, train.py: its flags, --help and --helpfull, docs/flags.md, --summary, and
the refusals of the command as a whole, each in one line."""

import dataclasses
import os
import re

import pytest

import train
from nin_jax import config as config_module
from nin_jax.config import Config

from conftest import REPO_ROOT, run_cli


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch_size", "0"], "--batch_size must be from 1 to 65,536, got 0"),
        (["--num_epochs", "-1"], "--num_epochs must be positive"),
        (["--learning_rate", "0"], "--learning_rate must be positive"),
        (["--learning_rate", "inf"], "--learning_rate must be positive and finite, got inf"),
        (["--checkpoint_every_steps", "-1"], "--checkpoint_every_steps must be 0 (epoch ends only) or positive"),
        (["--resize", "66"], "--resize must be from 67 to 1,024 (NiN's pools need at least 67), got 66"),
        (["--resize", "big"], "invalid int value"),
        (["--parallel", "tpu"], "invalid choice"),
        (["--no_such_flag"], "unrecognized arguments"),
        (["--workdir", ""], "--workdir is empty (an unset shell variable?)"),
        (["--data_arrays", " "], "--data_arrays is empty"),
    ],
)
def test_cli_rejects_bad_flags_with_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_cli_missing_data_is_one_clear_line_and_nothing_else(tmp_path):
    """Nothing but the line: tfds' own absl warnings about the empty folder stay off the terminal."""
    result = run_cli("--data_dir", str(tmp_path), "--resize", "67", "--num_epochs", "1", JAX_PLATFORMS="cpu")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"train.py: error: Fashion-MNIST is not built in {tmp_path} and "), result.stderr
    assert "t10k-labels-idx1-ubyte.gz" in result.stderr


def test_help_shows_what_a_reader_of_the_book_needs_and_helpfull_every_flag():
    """--help: the recipe, data and workdir flags, at most 25; --helpfull: every flag, with its default."""
    short, full = run_cli("--help"), run_cli("--helpfull")
    assert short.returncode == full.returncode == 0
    shown = [line.split()[0] for line in short.stdout.splitlines() if line.startswith("  -")]
    assert len(shown) <= 25, shown
    for flag in ("--num_epochs", "--batch_size", "--learning_rate", "--resize", "--manual_dir", "--workdir", "--helpfull"):
        assert f"  {flag}" in short.stdout
    for field in dataclasses.fields(Config):
        shown_here = field.metadata["group"] in config_module.SHORT_HELP_GROUPS
        assert (f"  --{field.name}" in short.stdout) == shown_here, field.name
        assert f"  --{field.name}" in full.stdout, field.name
    assert full.stdout.count("(default:") >= len(Config.__dataclass_fields__)


def test_cli_batch_that_does_not_split_over_the_devices_is_one_line():
    result = run_cli("--batch_size", "18", "--resize", "67", "--parallel", "pmap")  # 4 devices, see conftest
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "train.py: error: --batch_size 18 does not split evenly over 4 devices; use a multiple of 4 (see --help)"
    )
    assert "Traceback" not in result.stderr


def test_cli_unwritable_workdir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")  # tests run as root, which chmod does not stop
    result = run_cli("--resize", "67", "--workdir", str(tmp_path / "file" / "run"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"train.py: error: cannot write to --workdir {tmp_path}/file/run: Not a directory"
    )
    assert "Traceback" not in result.stderr


def test_docs_document_every_flag():
    """docs/flags.md has each field of Config as --help shows it: its flag, default and help text,
    under the heading of the field's group, in --help's order of groups."""
    with open(os.path.join(REPO_ROOT, "docs", "flags.md")) as f:
        flags_page = f.read()
    sections = {}
    for section in flags_page.split("\n## ")[1:]:
        title, _, rows = section.partition("\n")
        sections[title.lower()] = rows.splitlines()
    assert list(sections) == list(config_module.GROUPS)
    expected = {group: [f"| `--{field.name}` | `{field.default}` | {field.metadata['help']} |"
                        for field in dataclasses.fields(Config) if field.metadata["group"] == group]
                for group in config_module.GROUPS}
    missing = {group: [row for row in rows if row not in sections[group]] for group, rows in expected.items()}
    assert not any(missing.values()), "docs/flags.md lacks these rows (or has them otherwise):\n" + "\n".join(
        f"## {group}\n" + "\n".join(rows) for group, rows in expected.items() if missing[group])


def test_helpfull_shows_the_flags_in_groups_each_with_its_default(capsys):
    with pytest.raises(SystemExit):
        train.main(["--helpfull"])
    shown = capsys.readouterr().out
    positions = [shown.index(f"\n{group}:\n") for group in config_module.GROUPS]
    assert positions == sorted(positions)
    for field in dataclasses.fields(Config):
        help_of_flag = shown[shown.index(f"  --{field.name}"):].split("\n  --")[0]
        assert "(default: " in " ".join(help_of_flag.split()), field.name


def test_summary_flag_prints_the_layers_and_exits_without_data():
    result = run_cli("--summary", "--resize", "96", "--data_dir", "/nonexistent")
    assert result.returncode == 0, result.stderr
    assert "(NHWC)" in result.stdout
    assert re.search(r"^block1 +\(1, 22, 22, 96\) +30,336$", result.stdout, re.MULTILINE)
    assert re.search(r"^flatten +\(1, 10\) +0$", result.stdout, re.MULTILINE)
    assert re.search(r"^total +1,992,166$", result.stdout, re.MULTILINE)
    assert "compiled" not in result.stdout and "epoch" not in result.stdout
