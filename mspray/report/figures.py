"""The report's figures: the score histogram (inline SVG) and the top-k most anomalous
images with their heatmaps and result rows."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
from urllib.parse import quote

import numpy as np
import pyarrow as pa

from mspray import storage
from mspray.artifacts.output import PART_COLUMN
from mspray.report.markup import e, score, stat
from mspray.report.stats import Group

log = logging.getLogger(__name__)

HIST_BINS = 40
#: Heatmaps outside the output folder are inlined up to this size (else linked).
INLINE_MAX_BYTES = 256_000


def histogram_svg(
    scores: np.ndarray,
    threshold: float | None,
    calibration: np.ndarray | None = None,
    bins: int = HIST_BINS,
    width: int = 680,
    height: int = 230,
) -> str:
    """Inline SVG: bars = the night's image scores (red above the threshold), a step line
    = the calibration scores scaled to the night's count, a dashed line = the threshold."""
    ml, mr, mt, mb = 48, 12, 14, 34
    pw, ph = width - ml - mr, height - mt - mb
    extra = [calibration] if calibration is not None and calibration.size else []
    lim = np.concatenate([scores, *extra, [threshold] if threshold is not None else []])
    edges = np.histogram_bin_edges(lim, bins=bins)
    lo, hi = float(edges[0]), float(edges[-1])
    counts = np.histogram(scores, edges)[0]
    expected = None
    if extra:
        expected = np.histogram(calibration, edges)[0] * (scores.size / calibration.size)
    ymax = max(float(counts.max()), float(expected.max()) if expected is not None else 0.0, 1.0)

    def x(v: float) -> float:
        return ml + (v - lo) / (hi - lo) * pw

    def y(c: float) -> float:
        return mt + ph - c / ymax * ph

    parts = [
        f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
        "<title>image score histogram</title>",
        f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" class="axis"/>',
        f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + ph}" class="axis"/>',
    ]
    for i, c in enumerate(counts):
        a, b = float(edges[i]), float(edges[i + 1])
        above = threshold is not None and (a + b) / 2 > threshold
        parts.append(
            f'<rect class="bar{" above" if above else ""}" data-count="{int(c)}" '
            f'x="{x(a):.1f}" y="{y(c):.1f}" width="{max(x(b) - x(a) - 1, 0.5):.1f}" '
            f'height="{ph - (y(c) - mt):.1f}"><title>{a:.4g} to {b:.4g}: {int(c)} '
            "images</title></rect>"
        )
    if expected is not None:
        pts = []
        for i, c in enumerate(expected):
            pts += [
                f"{x(float(edges[i])):.1f},{y(c):.1f}",
                f"{x(float(edges[i + 1])):.1f},{y(c):.1f}",
            ]
        parts.append(f'<polyline class="calib" points="{" ".join(pts)}"/>')
    for v in np.linspace(lo, hi, 5):
        parts.append(f'<text x="{x(v):.1f}" y="{mt + ph + 14}" text-anchor="middle">{v:.3g}</text>')
    parts.append(f'<text x="{ml - 4}" y="{mt + 4}" text-anchor="end">{ymax:.0f}</text>')
    parts.append(f'<text x="{ml - 4}" y="{mt + ph}" text-anchor="end">0</text>')
    parts.append(
        f'<text x="{ml + pw / 2:.1f}" y="{height - 4}" text-anchor="middle">image score</text>'
    )
    if threshold is not None:
        tx = x(threshold)
        parts.append(
            f'<line class="thr" x1="{tx:.1f}" y1="{mt}" x2="{tx:.1f}" y2="{mt + ph}"/>'
            f'<text class="thr-label" x="{tx + 4:.1f}" y="{mt + 10}">threshold '
            f"{threshold:.4g}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _data_uri(data: bytes, name: str) -> str:
    kind = "image/png" if name.lower().endswith(".png") else "image/jpeg"
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _image_src(map_path: str | None, output: str, inline: bool) -> str | None:
    """How the page refers to a heatmap: a relative link when it lies under the output
    folder (beside the report), else inlined when small enough and readable."""
    if not map_path:
        return None
    if storage.is_under(map_path, output) and not inline:
        return quote(storage.relative(map_path, output))
    try:
        if inline or storage.size(map_path) <= INLINE_MAX_BYTES:
            return _data_uri(storage.read_bytes(map_path), map_path)
    except OSError as err:
        log.warning("heatmap %s not readable: %s", map_path, err)
    if storage.is_remote(map_path):
        return None
    return "file://" + quote(os.path.abspath(map_path))


def render_top(g: Group, gi: int, key: str, output: str, top_k: int, inline: bool) -> str:
    """The ``top_k`` most anomalous images of group ``g`` (the ``gi``-th on the page): a
    card each (heatmap, score, link to its row), then their result rows."""
    order = np.argsort(-g.scores, kind="stable")[:top_k]
    idx = g.ok[order]
    rows = g.rows.take(pa.array(idx, pa.int64())).to_pylist()
    score_cols = [c for c in g.rows.column_names if c.startswith("score_")]
    out = [f'<h3>Top {len(rows)} most anomalous images</h3><div class="grid">']
    srcs = [_image_src(row.get("map_path"), output, inline) for row in rows]
    for r, (row, src) in enumerate(zip(rows, srcs, strict=True)):
        anchor = f"row-{gi}-{r}"
        flag = '<span class="yes">anomalous</span>' if row.get("is_anomalous") else "normal"
        if src is None:
            img = '<div class="nomap">no heatmap (score with --maps)</div>'
        else:
            link = src if not src.startswith("data:") else "#" + anchor
            img = (
                f'<a href="{e(link)}"><img class="map" src="{e(src)}" '
                f'alt="heatmap of {e(row["path"])}"></a>'
            )
        out.append(
            f'<div class="card" data-rank="{r + 1}">{img}<div>#{r + 1} score '
            f"{stat('top_score', score(row['image_score']), key)} · {flag} · "
            f'<a href="#{anchor}">row</a></div><div>{e(row["path"])}</div></div>'
        )
    out.append("</div>")
    cols = ["path", "image_score", "is_anomalous", *score_cols, "threshold", "model_version",
            "scored_at", "map_path"]  # fmt: skip
    out.append('<div class="scroll"><table class="rows"><tr><th>#</th>')
    out.append("".join(f"<th>{e(c)}</th>" for c in cols) + "<th>part</th></tr>")
    for r, row in enumerate(rows):
        cells = []
        for c in cols:
            v = row.get(c)
            if c == "map_path" and v:  # the full URI is in the link's title
                src = srcs[r] if srcs[r] and not srcs[r].startswith("data:") else None
                text = e(storage.basename(v))
                cells.append(
                    f'<td><a href="{e(src)}" title="{e(v)}">{text}</a></td>'
                    if src
                    else f'<td title="{e(v)}">{text}</td>'
                )
                continue
            if isinstance(v, float):
                v = score(v)
            elif isinstance(v, dt.datetime):
                v = v.isoformat(timespec="seconds")
            cells.append(f"<td>{e('' if v is None else v)}</td>")
        part = row[PART_COLUMN]
        out.append(
            f'<tr id="row-{gi}-{r}"><td>{r + 1}</td>{"".join(cells)}'
            f'<td><a href="{e(quote(part))}">{e(part)}</a></td></tr>'
        )
    out.append("</table></div>")
    return "".join(out)
