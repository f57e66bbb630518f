"""The package's layering holds: the core imports no Ray, the model imports nothing from
training, and nothing imports Ray's private modules.

Walks the import statements of every module (static, so an import inside a function counts
too) rather than importing them, so a lazy ``import ray`` deep in a core function is caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mspray"
REPO = PKG.parent
CORE = sorted(p for p in PKG.rglob("*.py") if "ray" not in p.relative_to(PKG).parts)
RAY_LAYER = sorted((PKG / "ray").rglob("*.py"))
#: Core modules allowed to reach into the Ray layer: the CLI and the demo *are* entry points
#: that drive every layer (lazily, inside their commands).
ENTRY_POINTS = {PKG / "cli.py", PKG / "demo.py"}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", [p for p in CORE if p not in ENTRY_POINTS], ids=_rel)
def test_core_imports_no_ray(path: Path) -> None:
    bad = sorted(
        m for m in imported_modules(path) if m == "ray" or m.startswith(("ray.", "mspray.ray"))
    )
    assert not bad, f"{_rel(path)} (core) imports {bad}"


@pytest.mark.parametrize("path", sorted((PKG / "model").rglob("*.py")), ids=_rel)
def test_model_imports_nothing_from_train(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if m.startswith("mspray.train"))
    assert not bad, f"{_rel(path)} imports {bad}"


@pytest.mark.parametrize(
    "path", [*sorted(PKG.rglob("*.py")), *sorted((REPO / "ray_jobs").glob("*.py"))], ids=_rel
)
def test_no_private_ray_modules(path: Path) -> None:
    bad = sorted(
        m
        for m in imported_modules(path)
        if m.startswith("ray.")
        and (m.startswith("ray.dashboard") or any(p.startswith("_") for p in m.split(".")))
    )
    assert not bad, f"{_rel(path)} imports private Ray modules {bad}"


def test_the_walk_sees_lazy_imports(tmp_path: Path) -> None:
    """The checker itself: an import inside a function body is found."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import ray.data\n    from mspray.train.loop import x\n")
    assert {"ray.data", "mspray.train.loop", "mspray.train.loop.x"} <= imported_modules(f)


def test_ray_jobs_stay_thin() -> None:
    for job in sorted((REPO / "ray_jobs").glob("*.py")):
        n = len(job.read_text().splitlines())
        assert n <= 40, f"{_rel(job)} has {n} lines: move the logic into the library"


@pytest.mark.parametrize(
    "path", [p for p in sorted(PKG.rglob("*.py")) if p.name != "bundle.py"], ids=_rel
)
def test_bundle_files_are_read_only_through_bundle_py(path: Path) -> None:
    """meta.json / config.json of a bundle are parsed in one place (versions, checksums)."""
    strings = {
        n.value
        for n in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    assert not strings & {"meta.json", "config.json"}, f"{_rel(path)} opens bundle files"
