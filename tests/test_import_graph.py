"""The house has one direction of dependence, read from every import statement of every module
(module level, inside functions and under TYPE_CHECKING alike):

- shared_model imports nothing from client, server or sim, and neither flwr nor pydicom;
- server imports nothing from client;
- only the three command-line modules import the command-line edge (shared_model.cli_edge).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shared_model", "client", "server", "sim")
FORBIDDEN = {"shared_model": {"client", "server", "sim", "flwr", "pydicom"}, "server": {"client"}}
CLI_EDGE = "shared_model.cli_edge"
CLI_MODULES = {"client.cli", "server.cli", "sim.cli"}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names (relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def arrows(root: Path = REPO) -> list[tuple[str, str]]:
    """(importing module, imported module) over the four packages."""
    out = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            out += [(module_name(path, root), target) for target in sorted(imported_modules(path, root))]
    return out


def wrong_arrows(root: Path = REPO) -> list[tuple[str, str]]:
    def top(module: str) -> str:
        return module.split(".", 1)[0]

    return [(source, target) for source, target in arrows(root)
            if top(target) in FORBIDDEN.get(top(source), set())]


def test_no_import_points_against_the_direction_of_dependence() -> None:
    assert wrong_arrows() == []


def test_only_the_command_lines_import_the_command_line_edge() -> None:
    users = {source for source, target in arrows() if target == CLI_EDGE}
    assert users and users <= CLI_MODULES


@pytest.mark.parametrize("package, source, arrow", [
    ("shared_model", "import client.store\n", "client.store"),
    ("shared_model", "def f():\n    from server.app import PhaseSpec\n", "server.app"),
    ("shared_model", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import flwr\n", "flwr"),
    ("server", "from client.protocol import PLAN_KEY\n", "client.protocol"),
])
def test_the_walk_finds_every_kind_of_wrong_arrow(tmp_path: Path, package: str, source: str,
                                                  arrow: str) -> None:
    # Prepare: a repository laid out like this one, with one module importing the wrong way
    for name in PACKAGES:
        (tmp_path / name).mkdir()
    (tmp_path / package / "probe.py").write_text(source, encoding="utf-8")
    # Execute
    wrong = wrong_arrows(tmp_path)
    # Assert
    assert (f"{package}.probe", arrow) in wrong


def test_relative_imports_resolve_inside_their_package(tmp_path: Path) -> None:
    # Prepare
    probe = tmp_path / "shared_model" / "ssl" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from .. import tasks\nfrom .base import SSLModel\n", encoding="utf-8")
    # Execute
    found = imported_modules(probe, tmp_path)
    # Assert
    assert {"shared_model.tasks", "shared_model.ssl.base"} <= found
