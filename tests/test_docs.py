"""Every relative link in README.md, docs/ and the notebook leads somewhere: to a file that exists
and, after a '#', to a heading of that file (anchors as GitHub makes them)."""

import glob
import json
import os
import re
from typing import Iterator

import pytest

from conftest import REPO_ROOT

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCED_CODE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def markdown_files() -> list[str]:
    return [os.path.join(REPO_ROOT, "README.md")] + sorted(glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))


def markdown_of(path: str) -> str:
    """A Markdown file's text, or the Markdown cells of a notebook joined."""
    with open(path) as f:
        if not path.endswith(".ipynb"):
            return f.read()
        cells = json.load(f)["cells"]
    return "\n\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")


def prose(markdown: str) -> str:
    """The text whose links a reader can follow: no code, no comments."""
    return INLINE_CODE.sub("", FENCED_CODE.sub("", HTML_COMMENT.sub("", markdown)))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> Iterator[str]:
    """Every heading's anchor; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCED_CODE.sub("", markdown)):
        name = anchor(heading)
        count = seen.get(name, 0)
        seen[name] = count + 1
        yield name if count == 0 else f"{name}-{count}"


def broken_links(path: str) -> list[str]:
    broken = []
    for target in LINK.findall(prose(markdown_of(path))):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...: not this repository's
            continue
        file_part, _, fragment = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(linked):
            broken.append(f"{target}: no such file")
        elif fragment and fragment not in set(anchors(markdown_of(linked))):
            broken.append(f"{target}: no heading with that anchor")
    return broken


@pytest.mark.parametrize("path", markdown_files() + [os.path.join(REPO_ROOT, "notebooks", "nin.ipynb")],
                         ids=lambda path: os.path.relpath(path, REPO_ROOT))
def test_every_relative_link_resolves(path):
    assert not broken_links(path), f"{os.path.relpath(path, REPO_ROOT)}: {broken_links(path)}"


def test_the_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Some `code`, and more\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n[ok](other.md#some-code-and-more) [ok](#page) [gone](missing.md) [bad](other.md#nowhere)\n"
        "`[in code](missing.md)` ![picture](other.md) [web](https://example.com/x.md)\n"
    )
    assert broken_links(str(page)) == ["missing.md: no such file", "other.md#nowhere: no heading with that anchor"]


def test_anchors_follow_github():
    assert list(anchors("# Why the default initialisation is not the book's\n## A\n## A\n")) == [
        "why-the-default-initialisation-is-not-the-books", "a", "a-1"
    ]


def test_the_colab_badges_and_the_notebooks_install_name_the_repository_of_pyproject():
    """One repository: the one pyproject.toml names is where the badges open the notebook, and
    where the notebook's first cell installs from outside a checkout."""
    with open(os.path.join(REPO_ROOT, "pyproject.toml")) as f:
        (repository,) = re.findall(r'^Repository = "https://github\.com/([\w.-]+/[\w.-]+)"$', f.read(), re.M)
    badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"(https://colab.research.google.com/github/{repository}/blob/main/notebooks/nin.ipynb)")
    notebook_path = os.path.join(REPO_ROOT, "notebooks", "nin.ipynb")
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        assert badge in f.read()
    assert markdown_of(notebook_path).startswith(badge)
    with open(notebook_path) as f:
        install_cell = "".join(next(c for c in json.load(f)["cells"] if c["cell_type"] == "code")["source"])
    assert f'REPOSITORY = "https://github.com/{repository}"' in install_cell
