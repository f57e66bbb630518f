"""Small HTML pieces the report's page and figures share."""

from __future__ import annotations

import html
from importlib.resources import files


def e(x) -> str:
    """``x`` as escaped HTML text (attribute-safe)."""
    return html.escape(str(x), quote=True)


def num(n: int) -> str:
    """An integer with thousands separators."""
    return f"{n:,}"


def pct(x: float | None) -> str:
    """A fraction as a percentage, or ``unknown``."""
    return "unknown" if x is None else f"{100 * x:.1f} %"


def score(x: float | None) -> str:
    """An image score, 4 significant digits (empty for None)."""
    return "" if x is None else f"{x:.4g}"


def stat(key: str, text: str, group: str | None = None) -> str:
    """A figure tagged with ``data-stat`` (and ``data-group``): what tests and scripts read
    off the page."""
    g = "" if group is None else f' data-group="{e(group)}"'
    return f'<span class="num" data-stat="{e(key)}"{g}>{e(text)}</span>'


def kpi(label: str, key: str, value: str, group: str | None = None) -> str:
    """One labelled figure of a row of key figures."""
    return f'<div class="kpi"><span class="label">{e(label)}</span>{stat(key, value, group)}</div>'


def asset(name: str) -> str:
    """A file shipped beside this module (the page's CSS and script)."""
    return files(__package__).joinpath(name).read_text(encoding="utf-8")
