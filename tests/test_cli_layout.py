"""Where the command line and the Ray start-up live: the ``mspray`` console script is the
package ``mspray/cli`` (nothing else imports it, it imports no Ray itself), and only
``mspray/ray/runtime.py`` starts or joins Ray."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mspray"
REPO = PKG.parent
CLI = sorted((PKG / "cli").rglob("*.py"))
SOURCES = [*sorted(PKG.rglob("*.py")), *sorted((REPO / "ray_jobs").glob("*.py"))]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _calls_ray_init(path: Path) -> bool:
    """``ray.init(...)`` anywhere in ``path`` (also ``import ray as r; r.init``)."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {"ray"} | {
        a.asname for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        if a.name == "ray" and a.asname
    }  # fmt: skip
    return any(
        isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "init"
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id in aliases
        for n in ast.walk(tree)
    )


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_only_the_runtime_calls_ray_init() -> None:
    callers = [_rel(p) for p in SOURCES if _calls_ray_init(p)]
    assert callers == ["mspray/ray/runtime.py"]


@pytest.mark.parametrize("path", CLI, ids=_rel)
def test_cli_reaches_ray_only_through_the_ray_layer(path: Path) -> None:
    bad = sorted(m for m in _imports(path) if m == "ray" or m.startswith("ray."))
    assert not bad, f"{_rel(path)} imports {bad}: put that code under mspray/ray/"


@pytest.mark.parametrize("path", [p for p in SOURCES if p not in CLI], ids=_rel)
def test_nothing_below_the_cli_imports_it(path: Path) -> None:
    if path.parent.name == "ray_jobs":
        return  # the jobs are thin callers of mspray.cli.main
    bad = sorted(m for m in _imports(path) if m == "mspray.cli" or m.startswith("mspray.cli."))
    assert not bad, f"{_rel(path)} imports the command line {bad}"


@pytest.mark.parametrize("path", CLI, ids=_rel)
def test_cli_modules_stay_small(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= 300, f"{_rel(path)} has {n} lines: split the command group"


def test_every_command_has_help() -> None:
    from mspray.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) >= {
        "train", "evaluate", "calibrate", "build-bank", "score", "serve", "deploy", "export",
        "report", "demo",
    }  # fmt: skip
    for name, parser in sub.choices.items():
        assert parser.format_help().startswith(f"usage: mspray {name}")
