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


# The addresses the project names, each a page that exists: no link may lead nowhere. A new one
# is added here once someone has opened it.
KNOWN_URLS = {
    "https://ui.perfetto.dev",  # Perfetto's trace viewer, for --profile_steps
    "https://orbax.readthedocs.io",  # orbax's documentation
    "https://example.com/x.md",  # in this file's own test of the link checker
    "https://github.com/jax-ml/jax/issues/28247",  # the persistent cache with XLA's kernel cache, open
    "https://github.com/jax-ml/jax/pull/22899",  # why JAX keeps XLA's kernel cache off by default
}
URL = re.compile(r"https?://[^\s)\"'`\\,]+")
TEXT_FILES = (".md", ".py", ".toml", ".ipynb", ".sh", ".txt", ".cfg", ".yml", ".yaml", ".json")


def project_text_files() -> list[str]:
    """Every text file of the project, outside environments, caches and git's own folder."""
    found = []
    for folder, subfolders, names in os.walk(REPO_ROOT):
        subfolders[:] = [name for name in subfolders if not name.startswith(".") or name == ".ci"]
        subfolders[:] = [name for name in subfolders if name not in ("build", "runs", "__pycache__")
                         and not name.endswith(".egg-info")]
        found += [os.path.join(folder, name) for name in names if name.endswith(TEXT_FILES) or folder.endswith(".ci")]
    return found


def unknown_urls(paths: list[str]) -> list[str]:
    """The addresses in `paths` that are not known to exist; one written with a placeholder of the
    user's (`https://github.com/<you>/...`) names no page of its own."""
    unknown = []
    for path in paths:
        with open(path, errors="replace") as f:
            for url in URL.findall(f.read()):
                url = url.rstrip(".;:")
                if "<" not in url and "{" not in url and url not in KNOWN_URLS:
                    unknown.append(f"{os.path.relpath(path, REPO_ROOT)}: {url}")
    return unknown


def test_every_url_the_project_names_is_a_known_page():
    assert not unknown_urls(project_text_files())


def test_the_url_check_finds_an_unknown_address_and_passes_a_placeholder(tmp_path):
    gone = "https://" + "github.com/nin-jax/nin_jax"  # the repository the badges once named, which does not exist
    page = tmp_path / "page.md"
    page.write_text(f"see https://ui.perfetto.dev. and {gone}, or git+https://github.com/<you>/<your copy>\n")
    assert unknown_urls([str(page)]) == [f"{os.path.relpath(page, REPO_ROOT)}: {gone}"]


def test_the_readme_is_a_short_front_door_that_shows_the_model_and_the_quick_run():
    """At most 150 lines; NiN in Python; and the quick command it shows is the one a long run on a
    CPU prints (run/cpu_estimate.py's flags), so that the figures beside it are that command's."""
    from nin_jax.run import cpu_estimate

    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 150
    assert "from nin_jax.models import NiN" in readme and "model = NiN()" in readme
    quick = " ".join(f"{flag} {value}" for flag, value in cpu_estimate.QUICK_FLAGS.items())
    assert re.search(rf"^python train\.py [^\n]*{re.escape(quick)} --workdir runs/quick$", readme, re.M), quick
