"""The package's layering holds: the core imports neither Ray nor the layers above it (the
Ray layer, the CLI), the Ray layer does not import the CLI, the CLI reaches Ray only through
the Ray layer, no import cycle exists, only one module starts Ray, the model imports nothing
from training, nothing imports Ray's private modules, and no module grows past 450 lines.

Walks the import statements of every module (static, so an import inside a function counts
too) rather than importing them, so a lazy ``import ray`` deep in a core function is caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mspray"
REPO = PKG.parent
RAY_LAYER = sorted((PKG / "ray").rglob("*.py"))
#: Modules allowed to reach into the Ray layer: the CLI (the demo among its commands) is the
#: entry point that drives every layer (lazily, inside its commands); it never imports Ray
#: itself.
ENTRY_POINTS = set((PKG / "cli").rglob("*.py"))
CORE = sorted(
    p for p in PKG.rglob("*.py") if "ray" not in p.relative_to(PKG).parts and p not in ENTRY_POINTS
)
#: The one module that starts or joins a Ray cluster.
RAY_INIT_HOME = PKG / "ray" / "runtime.py"


def module_name(path: Path) -> str:
    parts = (
        list(path.relative_to(REPO).with_suffix("").parts)
        if path.is_relative_to(REPO)
        else [path.stem]
    )
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` per import statement, relative imports resolved; ``names`` empty
    for ``import module``. Imports under ``if TYPE_CHECKING:`` count like any other: a
    dependency only the type checker sees is still a dependency between layers."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            out.append((base, [a.name for a in node.names]))
    return out


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (``from m import x`` gives ``m``
    and ``m.x``)."""
    names: set[str] = set()
    for base, members in _imports(path):
        names.add(base)
        names.update(f"{base}.{m}" for m in members)
    return names


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str) -> str | None:
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) or None


def import_graph() -> dict[str, set[str]]:
    """``module -> mspray modules it imports``, lazy and type-checking imports included.
    ``from pkg import sub`` is an arrow to ``pkg.sub``
    when that is a module, else to ``pkg``."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps: set[str] = set()
        for base, members in _imports(path):
            targets = [f"{base}.{m}" for m in members] if members else [base]
            for target in targets:
                found = _resolve(target)
                if found and found != name:
                    deps.add(found)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", [p for p in CORE if p not in ENTRY_POINTS], ids=_rel)
def test_core_imports_no_ray(path: Path) -> None:
    bad = sorted(
        m for m in imported_modules(path) if m == "ray" or m.startswith(("ray.", "mspray.ray"))
    )
    assert not bad, f"{_rel(path)} (core) imports {bad}"


@pytest.mark.parametrize("path", CORE, ids=_rel)
def test_core_imports_nothing_above_it(path: Path) -> None:
    """The core is the bottom layer: it never reaches up into the Ray layer or the CLI."""
    bad = sorted(m for m in imported_modules(path) if m.startswith(("mspray.ray", "mspray.cli")))
    assert not bad, f"{_rel(path)} (core) imports {bad}"


@pytest.mark.parametrize("path", RAY_LAYER, ids=_rel)
def test_ray_layer_does_not_import_the_cli(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if m.startswith("mspray.cli"))
    assert not bad, f"{_rel(path)} (Ray layer) imports the CLI: {bad}"


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles among mspray modules: " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_the_cycle_check_finds_a_cycle() -> None:
    """The checker itself, on a graph with the old bundle -> detector -> export circle."""
    graph = {"bundle": {"detector"}, "detector": {"export"}, "export": {"bundle"}, "x": {"y"}}
    assert cycles(graph) == [["bundle", "detector", "export"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def _calls_ray_init(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "ray"
            and any(a.name == "init" for a in node.names)
        ):
            return True
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "init"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "ray"
        ):
            return True
    return False


def test_only_one_module_starts_ray() -> None:
    files = [*sorted(PKG.rglob("*.py")), *sorted((REPO / "ray_jobs").glob("*.py"))]
    callers = [_rel(p) for p in files if _calls_ray_init(p)]
    assert callers == [_rel(RAY_INIT_HOME)], f"ray.init is called in {callers}"


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


@pytest.mark.parametrize("path", sorted(ENTRY_POINTS), ids=_rel)
def test_cli_reaches_ray_only_through_the_ray_layer(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if m == "ray" or m.startswith("ray."))
    assert not bad, f"{_rel(path)} imports {bad}: put that code under mspray/ray/"


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=_rel)
def test_modules_stay_small(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= 450, f"{_rel(path)} has {n} lines: split it by concept"


def test_the_walk_sees_type_checking_imports(tmp_path: Path) -> None:
    """The checker itself: an import only for the type checker is found too."""
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray\n")
    assert "ray" in imported_modules(f)


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
