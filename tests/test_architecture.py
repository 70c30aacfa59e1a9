"""The package's layout as docs/architecture.md draws it: rooms whose imports run downward only,
a core of four short files, and functions short enough to read."""

import ast
import os
import pathlib
import re

from conftest import REPO_ROOT

PACKAGE = pathlib.Path(REPO_ROOT, "nin_jax")
SUB_PACKAGES = ("ops", "run", "runtime", "data", "tools")
CORE = ("models.py", "steps.py", "input_pipeline.py", "trainer.py")
# The modules at the top of the package that only hand a command to its room (`python -m nin_jax.plan`).
COMMANDS = ("plan.py", "predict.py", "class_maps.py", "export.py", "export_arrays.py", "profile_report.py")


def room(path: pathlib.Path) -> str:
    """The room of a file, as the picture names it: a sub-package, a core module, 'commands', or
    'package' (nin_jax/__init__.py, which every import of the package runs first)."""
    relative = path.relative_to(REPO_ROOT)
    if relative.parts == ("nin_jax", "__init__.py"):
        return "package"
    if relative.parts == ("train.py",) or (relative.parent.name == "nin_jax" and relative.name in COMMANDS):
        return "commands"
    if relative.parts[1] in SUB_PACKAGES:
        return relative.parts[1]
    return relative.stem


def is_package(module: str) -> bool:
    return pathlib.Path(REPO_ROOT, *module.split("."), "__init__.py").exists()


def imported_modules(path: pathlib.Path) -> set[str]:
    """The nin_jax modules that a file imports, dotted: `from nin_jax.run import hooks` imports
    nin_jax.run.hooks, `from nin_jax.config import Config` nin_jax.config."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nin_jax"):
            if is_package(node.module):
                modules.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names if alias.name.startswith("nin_jax"))
    return modules


def room_of_module(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "nin_jax"
    return parts[1] if parts[1] in SUB_PACKAGES else parts[1]


def package_files() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py")) + [pathlib.Path(REPO_ROOT, "train.py")]


def imports_between_rooms() -> set[tuple[str, str]]:
    edges = set()
    for path in package_files():
        for module in imported_modules(path):
            target = room_of_module(module)
            if target != room(path):
                edges.add((room(path), target))
    return edges


def drawn_imports() -> set[tuple[str, str]]:
    with open(os.path.join(REPO_ROOT, "docs", "architecture.md")) as f:
        page = f.read()
    return set(re.findall(r"^\s+(\w+) --> (\w+)$", page, re.M))


def test_the_picture_shows_every_import_between_rooms_and_no_other():
    actual, drawn = imports_between_rooms(), drawn_imports()
    assert not actual - drawn, f"imports that docs/architecture.md does not draw: {sorted(actual - drawn)}"
    assert not drawn - actual, f"arrows of docs/architecture.md that no import makes: {sorted(drawn - actual)}"


def test_imports_run_downward_only():
    """The rooms in an order where every import points to a room further down: no circle."""
    edges, order = imports_between_rooms(), []
    rooms = {source for source, _ in edges} | {target for _, target in edges}
    while rooms:
        tops = sorted(name for name in rooms if not any(target == name for _, target in edges if _ in rooms))
        assert tops, f"a circle among {sorted(rooms)}"
        order += tops
        rooms -= set(tops)
    assert order[0] == "commands" and order[-1] == "ops", order


def test_the_core_is_four_short_files_that_import_little():
    assert sum(len(PACKAGE.joinpath(name).read_text().splitlines()) for name in CORE) <= 600
    assert {room_of_module(module) for module in imported_modules(PACKAGE / "models.py")} == {"ops"}
    assert {room_of_module(module) for module in imported_modules(PACKAGE / "steps.py")} == {
        "models", "input_pipeline", "config"}
    assert len(imported_modules(PACKAGE / "trainer.py")) <= 8


def test_no_function_of_the_package_is_longer_than_60_lines():
    long = [f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name}" for path in package_files()
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, long


def test_the_checks_see_an_import_that_runs_back_up(tmp_path, monkeypatch):
    """The test above fails on a circle: ops importing the trainer."""
    ops_file = PACKAGE / "ops" / "layers.py"
    text = ops_file.read_text()
    monkeypatch.setattr(pathlib.Path, "read_text",
                        lambda self, *args, **kwargs: text + "\nfrom nin_jax import trainer\n" if self == ops_file
                        else pathlib.Path.read_bytes(self).decode())
    assert ("ops", "trainer") in imports_between_rooms()
    try:
        test_imports_run_downward_only()
    except AssertionError as error:
        assert "a circle" in str(error)
    else:
        raise AssertionError("a circle went unseen")
