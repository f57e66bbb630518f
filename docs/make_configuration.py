"""Write docs/configuration.md from mspray/config.py (fields, defaults, help) and the CLI
(which flag sets each field, in which commands).

    python docs/make_configuration.py           # rewrite docs/configuration.md
    python docs/make_configuration.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mspray.cli import build_parser
from mspray.config import field_info
from mspray.config_docs import ROOTS, FlagUses, render

OUT = Path(__file__).resolve().parent / "configuration.md"


def _field_keys(prefix: str, key: str, option_strings: list[str]) -> list[str]:
    """Dotted reference keys that a parsed ``<prefix>:<key>`` destination sets: the field
    ``key`` of the root named ``prefix`` (the bundle config for any other prefix), or, for a
    flag that is not a field of its own (``--bundle``), the fields declaring that flag."""
    name, root = next(((n, r) for n, r in ROOTS if n == prefix), ROOTS[0])
    try:
        field_info(root, key)
    except (KeyError, AttributeError):
        found = []
        if name:
            for field, info in root.model_fields.items():
                extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
                if extra.get("cli") in option_strings:
                    found.append(f"{name}.{field}")
        return found
    return [f"{name}.{key}" if name else key]


def flags_by_key(parser: argparse.ArgumentParser) -> dict[str, FlagUses]:
    """``{dotted key: [(flag, [command, ...]), ...]}`` over every sub-command of ``parser``."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    uses: dict[str, dict[str, list[str]]] = {}
    for command, p in sub.choices.items():
        for action in p._actions:
            prefix, sep, key = action.dest.partition(":")
            if not sep or not action.option_strings:
                continue
            for dotted in _field_keys(prefix, key, action.option_strings):
                flag = action.option_strings[-1]
                commands = uses.setdefault(dotted, {}).setdefault(flag, [])
                if command not in commands:
                    commands.append(command)
    return {k: sorted(v.items()) for k, v in uses.items()}


def markdown() -> str:
    """docs/configuration.md as it should be now."""
    return render(flags_by_key(build_parser()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = p.parse_args(argv)
    text = markdown()
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT} is out of date: run python docs/make_configuration.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
