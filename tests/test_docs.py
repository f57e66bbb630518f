"""The README and docs/ stay short, true and linked: the set-up commands, links, the one
diagram, the configuration reference and the commands and jobs they name."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DEMO_COMMAND = (
    "python -m pip install -c constraints-cpu.txt -e . && mspray demo --out /tmp/mspray-demo"
)
TEST_COMMAND = 'python -m pip install -c constraints-cpu.txt -e ".[dev]" && python -m pytest -q'
MAX_README_LINES = 250


def _doc_files() -> list[Path]:
    """Every Markdown page a reader is sent to: the README, docs/ and the benchmarks page."""
    return [README, *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]


def _section(text: str, title: str) -> str:
    """The text from the heading ``title`` to the next heading of the same or a higher level
    (lines inside code fences are not headings)."""
    lines = text.splitlines()
    start = lines.index(title)
    level = len(title) - len(title.lstrip("#"))
    fenced = False
    for end in range(start + 1, len(lines)):
        line = lines[end]
        fenced ^= line.startswith("```")
        hashes = len(line) - len(line.lstrip("#"))
        if not fenced and 0 < hashes <= level and line[hashes : hashes + 1] == " ":
            return "\n".join(lines[start:end])
    return "\n".join(lines[start:])


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_readme_fits_on_a_page_and_keeps_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    quick = _section(text, "## Quick start")
    assert DEMO_COMMAND in quick
    assert TEST_COMMAND in quick


def test_every_relative_link_resolves() -> None:
    """Links between the README and docs/ point at files (and headings) that exist."""
    broken = []
    for page in _doc_files():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_one_mermaid_diagram_in_one_place() -> None:
    counts = {p.relative_to(REPO): p.read_text().count("```mermaid") for p in _doc_files()}
    assert sum(counts.values()) == 1, counts
    assert counts[Path("README.md")] == 1


def test_readme_command_table_lists_every_command() -> None:
    from mspray.cli import build_parser

    table = _section(README.read_text(), "## Commands")
    listed = set(re.findall(r"^\| `mspray ([a-z-]+)`", table, flags=re.M))
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) <= listed, set(sub.choices) - listed


def test_docs_name_only_existing_jobs_and_commands() -> None:
    from mspray.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for page in _doc_files():
        text = page.read_text()
        for job in set(re.findall(r"ray_jobs/(\w+)\.py", text)):
            assert (REPO / "ray_jobs" / f"{job}.py").is_file(), f"{page.name} names {job}.py"
        for cmd in set(re.findall(r"^\s*mspray ([a-z-]+)", text, flags=re.M)):
            assert cmd in sub.choices, f"{page.name} names `mspray {cmd}`"


def _default_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def test_configuration_reference_documents_every_field() -> None:
    """docs/configuration.md lists every field of mspray/config/__init__.py with its default."""
    from mspray.config import MSPrayConfig

    text = (REPO / "docs" / "configuration.md").read_text()
    cfg = MSPrayConfig()
    for section in MSPrayConfig.model_fields:
        table = _section(text, f"### `{section}`")
        for name in type(getattr(cfg, section)).model_fields:
            default = _default_text(getattr(getattr(cfg, section), name))
            row = f"| `{name}` | `{default}` |"
            assert row in table, f"docs/configuration.md: no row {row!r} under {section}"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("docs_generate", REPO / "docs" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_are_up_to_date() -> None:
    """docs/configuration.md and the table of scales in docs/concepts.md are exactly what
    docs/generate.py renders from mspray/config/__init__.py, the CLI and mspray/model/scales.py now;
    after changing a field, a flag or a scale, run that script."""
    for path, expected in _generator().expected_pages().items():
        assert path.read_text() == expected, f"{path.name} is out of date: python docs/generate.py"


def test_scale_table_has_a_row_per_scale() -> None:
    from mspray.model.scales import SUPPORTED_SCALES

    text = (REPO / "docs" / "concepts.md").read_text()
    for scale in SUPPORTED_SCALES:
        assert f"\n| {scale} px |" in text, scale


def test_every_config_field_has_help() -> None:
    _generator()  # puts docs/ on the path: config_docs.py sits beside the generator
    from config_docs import sections

    missing = [
        f"{name}.{field}"
        for name, model in sections()
        for field, info in model.model_fields.items()
        if not info.description
    ]
    assert not missing, missing


def test_architecture_lists_every_module() -> None:
    """docs/architecture.md names every module of mspray/ (a file by its path, or by its
    name on the row of its package's folder), so the module table follows the layout."""
    lines = (REPO / "docs" / "architecture.md").read_text().splitlines()
    text = "\n".join(lines)
    missing = []
    for path in sorted((REPO / "mspray").rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        rel = path.relative_to(REPO).as_posix()
        folder = path.parent.relative_to(REPO).as_posix() + "/"
        on_folder_row = any(f"`{folder}`" in line and path.name in line for line in lines)
        if f"`{rel}`" not in text and not on_folder_row:
            missing.append(rel)
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_docs_name_only_existing_modules() -> None:
    """Every ``mspray/...`` path and ``python -m mspray...`` module in the README and docs/
    exists."""
    missing = []
    for page in _doc_files():
        text = page.read_text()
        for rel in set(re.findall(r"`(mspray/[\w/]*\w(?:\.py|/)?)`", text)):
            if not (REPO / rel).exists():
                missing.append(f"{page.relative_to(REPO)}: {rel}")
        for module in set(re.findall(r"python -m (mspray[\w.]*)", text)):
            if importlib.util.find_spec(module) is None:
                missing.append(f"{page.relative_to(REPO)}: python -m {module}")
    assert not missing, missing
