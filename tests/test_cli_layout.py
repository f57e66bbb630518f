"""The ``mspray`` console script is the package ``mspray/cli``: small modules, one per
command group, that reach Ray only through the Ray layer (``tests/test_layering.py`` checks
that nothing below imports the CLI and that only ``mspray/ray/runtime.py`` starts Ray)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mspray"
REPO = PKG.parent
CLI = sorted((PKG / "cli").rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", CLI, ids=_rel)
def test_cli_reaches_ray_only_through_the_ray_layer(path: Path) -> None:
    bad = sorted(m for m in _imports(path) if m == "ray" or m.startswith("ray."))
    assert not bad, f"{_rel(path)} imports {bad}: put that code under mspray/ray/"


@pytest.mark.parametrize("path", CLI, ids=_rel)
def test_cli_modules_stay_small(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= 450, f"{_rel(path)} has {n} lines: split the command group"


def test_every_command_has_help() -> None:
    from mspray.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) >= {
        "train", "evaluate", "calibrate", "build-bank", "score", "serve", "deploy", "export",
        "report", "demo",
    }  # fmt: skip
    for name, parser in sub.choices.items():
        assert parser.format_help().startswith(f"usage: mspray {name}")
