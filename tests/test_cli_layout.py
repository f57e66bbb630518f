"""The ``mspray`` console script is the package ``mspray/cli``: one module per command group,
every command with its help (``tests/test_layering.py`` checks its imports and sizes)."""

from __future__ import annotations

from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mspray"
REPO = PKG.parent
CLI = sorted((PKG / "cli").rglob("*.py"))


def test_every_command_has_help() -> None:
    from mspray.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) >= {
        "train", "evaluate", "calibrate", "build-bank", "score", "serve", "deploy", "export",
        "report", "demo",
    }  # fmt: skip
    for name, parser in sub.choices.items():
        assert parser.format_help().startswith(f"usage: mspray {name}")
