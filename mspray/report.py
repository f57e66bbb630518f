"""The nightly report: one HTML page next to a scoring output's Parquet rows.

:func:`build_report` reads a scoring output folder (local or ``s3://``; layout in
:mod:`mspray.ray.data.results`) and writes ``OUTPUT/_report.html``:

- counts: result rows, scored, errors by reason, anomalous; the last run's listed / scored /
  skipped images from its ``_runs/`` summary;
- per model (the ``model`` column when there is one, else all rows): an inline SVG histogram
  of the image scores with the threshold, the anomaly rate next to what calibration expects
  (``1 - score.threshold_quantile``), and a drift check: a two-sample Kolmogorov-Smirnov
  test of the night's normal-looking scores against the bundle's held-out calibration
  scores, both cut at the threshold;
- the top-k most anomalous images with their heatmap panels and their rows.

The page is self-contained: inline CSS and SVG, heatmaps linked relatively (``_maps/...``,
beside the report) or inlined as data URIs. Calibration comes from the bundles passed in
(``meta.json``) or from the ``calibration`` block the scoring job writes into its run
summary, matched to the rows by model version. This module is core: it imports no Ray.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mspray import storage

log = logging.getLogger(__name__)

#: The leading ``_`` keeps the page out of Parquet dataset discovery (pandas / pyarrow /
#: Spark read every other file of the folder as Parquet), so ``pandas.read_parquet(OUTPUT)``
#: still returns exactly the result rows.
REPORT_NAME = "_report.html"
#: Run summaries folder; the same name as ``mspray.ray.data.results.RUNS_DIR`` (the core
#: does not import the Ray layer).
RUNS_DIR = "_runs"
#: Drift is flagged when the KS test rejects at this level AND the distributions differ by
#: at least DRIFT_MIN_STATISTIC (largest CDF gap): with thousands of images a night, p alone
#: flags shifts too small to matter.
DRIFT_ALPHA = 0.01
DRIFT_MIN_STATISTIC = 0.1
#: Fewer normal-looking scores than this on either side: no drift test.
DRIFT_MIN_SAMPLES = 5
#: Heatmaps outside the output folder are inlined up to this size (else linked).
INLINE_MAX_BYTES = 256_000
HIST_BINS = 40
#: ``data-group`` of the figures of the single group when rows have no ``model`` column.
ALL = "all"


# ----------------------------------------------------------------------------- calibration
@dataclass
class Calibration:
    """What a bundle's calibration says: threshold, its quantile, held-out normal scores."""

    version: str | None
    threshold: float | None = None
    quantile: float | None = None
    margin: float | None = None
    scores: list[float] | None = None
    source: str = ""

    @property
    def expected_rate(self) -> float | None:
        """Fraction of normal images expected above the threshold: ``1 - quantile``."""
        return None if self.quantile is None else 1.0 - self.quantile

    def to_dict(self) -> dict:
        """JSON form, as stored in a run summary's ``calibration`` block."""
        return {
            "version": self.version,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "margin": self.margin,
            "scores": self.scores,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str) -> Calibration:
        scores = d.get("scores")
        return cls(
            version=d.get("version"),
            threshold=_float_or_none(d.get("threshold")),
            quantile=_float_or_none(d.get("quantile")),
            margin=_float_or_none(d.get("margin")),
            scores=[float(s) for s in scores] if scores else None,
            source=d.get("source") or source,
        )


def _float_or_none(x) -> float | None:
    return None if x is None else float(x)


def calibration_from_bundle(bundle: str) -> Calibration:
    """The calibration recorded in a bundle's ``meta.json`` (quantile and margin fall back
    to its ``config.json`` for bundles calibrated before they were stored in meta)."""
    from mspray.bundle import read_config, read_meta

    meta = read_meta(bundle)
    quantile, margin = meta.get("threshold_quantile"), meta.get("threshold_margin")
    if quantile is None:
        score_cfg = read_config(bundle).score
        quantile, margin = score_cfg.threshold_quantile, score_cfg.threshold_margin
    scores = meta.get("calibration_scores")
    return Calibration(
        version=meta.get("version"),
        threshold=_float_or_none(meta.get("threshold")),
        quantile=_float_or_none(quantile),
        margin=_float_or_none(margin),
        scores=[float(s) for s in scores] if scores else None,
        source=f"bundle {storage.normalize(bundle)}",
    )


# ----------------------------------------------------------------------------- reading
def read_rows(output: str) -> pa.Table:
    """Every result row of ``output`` plus a ``_part`` column (the part file's name).

    Parts are the top-level ``*.parquet`` files not starting with ``_`` or ``.`` (what
    pyarrow / pandas discovery reads); their schemas are unified, so parts written by
    models with other scales (other ``score_<scale>`` columns) mix.
    """
    try:
        files = storage.list_files(output, suffixes=(".parquet",), recursive=False)
    except (FileNotFoundError, NotADirectoryError):
        files = []
    files = [f for f in files if not _basename(f).startswith(("_", "."))]
    if not files:
        return pa.table({"path": pa.array([], pa.string()), "_part": pa.array([], pa.string())})
    fs, _ = storage.filesystem(output)
    paths = [storage.filesystem(f)[1] for f in files]
    schema = pa.unify_schemas([pq.read_schema(p, filesystem=fs) for p in paths])
    dataset = pads.dataset(paths, filesystem=fs, format="parquet", schema=schema)
    tables = []
    for frag in dataset.get_fragments():
        t = frag.to_table(schema=schema)
        tables.append(t.append_column("_part", pa.array([_basename(frag.path)] * len(t))))
    return pa.concat_tables(tables)


def _basename(uri: str) -> str:
    return uri.replace("\\", "/").rsplit("/", 1)[-1]


def read_run_summaries(output: str) -> list[dict]:
    """The run summaries under ``_runs/``, oldest first (names start with a UTC stamp);
    each gets a ``_file`` key. Unreadable ones are skipped with a warning."""
    try:
        files = storage.list_files(
            storage.join(output, RUNS_DIR), suffixes=(".json",), recursive=False
        )
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for f in sorted(files, key=_basename):
        try:
            summary = json.loads(storage.read_text(f))
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable run summary %s: %s", f, e)
            continue
        if isinstance(summary, dict):
            out.append({**summary, "_file": _basename(f)})
    return out


def _summary_calibrations(summaries: list[dict]) -> list[Calibration]:
    out = []
    for s in summaries:
        block = s.get("calibration")
        blocks = block if isinstance(block, list) else [block] if isinstance(block, dict) else []
        out.extend(Calibration.from_dict(b, f"run summary {RUNS_DIR}/{s['_file']}") for b in blocks)
    return out


# ----------------------------------------------------------------------------- statistics
def error_reason(error: str, path: str | None = None) -> str:
    """The kind of an error message, for counting: without the file name, details in
    parentheses, and numbers (``cannot decode image``, ``empty file``, ``OSError``...)."""
    msg = error
    if path and msg.startswith(path):
        msg = msg[len(path) :].lstrip(": ")
    exc = re.match(r"([A-Za-z_]\w*(?:Error|Exception|Timeout|Interrupt))\b", msg)
    if exc:
        return exc.group(1)
    msg = re.sub(r"\d+", "N", msg.split(" (", 1)[0]).strip()
    return msg or "unknown"


@dataclass
class Drift:
    """Two-sample KS test of the night's normal-looking scores against calibration."""

    statistic: float
    pvalue: float
    n_night: int
    n_calibration: int
    drifted: bool
    night_median: float
    calibration_median: float


def drift_test(
    night: np.ndarray,
    calibration: np.ndarray,
    threshold: float,
    alpha: float = DRIFT_ALPHA,
    min_statistic: float = DRIFT_MIN_STATISTIC,
) -> Drift | None:
    """KS test of ``night`` vs ``calibration`` image scores, both cut at ``threshold``
    (only the normal-looking part: real anomalies must not read as drift). None when
    either side has fewer than :data:`DRIFT_MIN_SAMPLES` scores."""
    from scipy.stats import ks_2samp

    a = night[night <= threshold]
    b = calibration[calibration <= threshold]
    if min(a.size, b.size) < DRIFT_MIN_SAMPLES:
        return None
    res = ks_2samp(a, b)
    stat, p = float(res.statistic), float(res.pvalue)
    return Drift(
        stat, p, int(a.size), int(b.size), p < alpha and stat >= min_statistic,
        float(np.median(a)), float(np.median(b)),
    )  # fmt: skip


@dataclass
class Group:
    """The rows of one model."""

    name: str | None
    rows: pa.Table
    ok: np.ndarray  # row positions with a score
    scores: np.ndarray  # their image scores
    anomalous: int
    errors: int
    threshold: float | None
    versions: Counter
    calibration: Calibration | None = None
    calibration_note: str = ""
    drift: Drift | None = None
    notes: list[str] = field(default_factory=list)


def _column(table: pa.Table, name: str) -> list:
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [None] * len(table)


def _counts(table: pa.Table, name: str) -> Counter:
    """Non-null values of a column and how often each occurs."""
    if name not in table.column_names or not len(table):
        return Counter()
    vc = pc.value_counts(table.column(name).drop_null()).to_pylist()
    return Counter({d["values"]: d["counts"] for d in vc})


def _group(name: str | None, rows: pa.Table, calibrations: dict[str | None, Calibration]) -> Group:
    n = len(rows)
    if "image_score" in rows.column_names:
        scores_all = rows.column("image_score").to_numpy(zero_copy_only=False).astype(np.float64)
    else:
        scores_all = np.full(n, np.nan)
    failed = np.zeros(n, dtype=bool)
    if "error" in rows.column_names:
        failed = pc.is_valid(rows.column("error")).to_numpy(zero_copy_only=False)
    ok = np.flatnonzero(~np.isnan(scores_all) & ~failed)
    good = rows.take(pa.array(ok, pa.int64()))
    anomalous = 0
    if "is_anomalous" in good.column_names and len(good):
        anomalous = int(pc.sum(pc.fill_null(good.column("is_anomalous"), False)).as_py() or 0)
    versions = _counts(good, "model_version")
    thresholds = _counts(rows, "threshold")
    g = Group(
        name=name,
        rows=rows,
        ok=ok,
        scores=scores_all[ok],
        anomalous=anomalous,
        errors=int(failed.sum()),
        threshold=thresholds.most_common(1)[0][0] if thresholds else None,
        versions=versions,
    )
    if len(thresholds) > 1:
        g.notes.append(f"rows carry {len(thresholds)} different thresholds; the most common")
    version = versions.most_common(1)[0][0] if versions else None
    if len(versions) > 1:
        g.notes.append(
            f"rows of {len(versions)} model versions; compared with the calibration of the "
            f"most common one, {version}"
        )
    cal = calibrations.get(version)
    if cal is None and None in calibrations and len(calibrations) == 1:
        cal = calibrations[None]  # a calibration without a version: the only one there is
    if cal is None:
        known = sorted(str(v) for v in calibrations)
        g.calibration_note = (
            "no calibration known for model version "
            f"{version}" + (f" (known: {', '.join(known)})" if known else "")
            + ": pass its bundle with `mspray report OUTPUT --bundle URI`"
        )  # fmt: skip
    else:
        g.calibration = cal
        if g.threshold is None:
            g.threshold = cal.threshold
    if cal is not None and cal.scores and g.threshold is not None and g.scores.size:
        g.drift = drift_test(g.scores, np.asarray(cal.scores), g.threshold)
    return g


def _groups(table: pa.Table, calibrations: dict[str | None, Calibration]) -> list[Group]:
    """One group per value of the ``model`` column (nulls last), or one for all rows (no
    such column, or a single-bundle run's column of nulls)."""
    if "model" not in table.column_names or table.column("model").null_count == len(table):
        return [_group(None, table, calibrations)]
    model = table.column("model")
    out = [
        _group(str(name), table.filter(pc.equal(model, name)), calibrations)
        for name in sorted(_counts(table, "model"), key=str)
    ]
    if model.null_count:
        out.append(_group("(no model)", table.filter(pc.is_null(model)), calibrations))
    return out


# ----------------------------------------------------------------------------- rendering
def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(n: int) -> str:
    return f"{n:,}"


def _pct(x: float | None) -> str:
    return "unknown" if x is None else f"{100 * x:.1f} %"


def _score(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


def _stat(key: str, text: str, group: str | None = None) -> str:
    g = "" if group is None else f' data-group="{_e(group)}"'
    return f'<span class="num" data-stat="{_e(key)}"{g}>{_e(text)}</span>'


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


def _under(uri: str, folder: str) -> bool:
    if storage.is_remote(uri) != storage.is_remote(folder):
        return False
    sep = "/" if storage.is_remote(folder) else os.sep
    return uri.startswith(folder.rstrip(sep) + sep)


def _data_uri(data: bytes, name: str) -> str:
    kind = "image/png" if name.lower().endswith(".png") else "image/jpeg"
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _image_src(map_path: str | None, output: str, inline: bool) -> str | None:
    """How the page refers to a heatmap: a relative link when it lies under the output
    folder (beside the report), else inlined when small enough and readable."""
    if not map_path:
        return None
    if _under(map_path, output) and not inline:
        return quote(storage.relative(map_path, output))
    try:
        if inline or storage.size(map_path) <= INLINE_MAX_BYTES:
            return _data_uri(storage.read_bytes(map_path), map_path)
    except OSError as e:
        log.warning("heatmap %s not readable: %s", map_path, e)
    if storage.is_remote(map_path):
        return None
    return "file://" + quote(os.path.abspath(map_path))


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1100px;padding:0 16px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid
#dde2ea;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
.meta{color:#5b6577;font-size:13px}.num{font-variant-numeric:tabular-nums;font-weight:600}
table{border-collapse:collapse;margin:6px 0 10px}td,th{border:1px solid #dde2ea;
padding:3px 8px;text-align:left;vertical-align:top}th{background:#f3f5f9;font-weight:600}
td.r{text-align:right}.kpis{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.kpi{border:1px solid #dde2ea;border-radius:6px;padding:8px 12px;min-width:120px}
.kpi .label{color:#5b6577;font-size:12px}.kpi .num{font-size:20px;display:block}
.warn{background:#fff4e5;border:1px solid #f0b35b;border-radius:6px;padding:8px 12px}
.okbox{background:#eef8f0;border:1px solid #8fcf9c;border-radius:6px;padding:8px 12px}
.info{background:#f3f5f9;border:1px solid #dde2ea;border-radius:6px;padding:8px 12px}
svg.hist text{font-size:11px;fill:#5b6577}svg.hist .axis{stroke:#9aa3b2}
svg.hist .bar{fill:#4a7ab5}svg.hist .bar.above{fill:#d9534f}
svg.hist .calib{fill:none;stroke:#222;stroke-width:1.5}
svg.hist .thr{stroke:#d9534f;stroke-width:2;stroke-dasharray:5 3}
svg.hist .thr-label{fill:#d9534f;font-weight:600}
.legend span{display:inline-block;margin-right:14px;font-size:12px;color:#5b6577}
.sw{display:inline-block;width:12px;height:10px;margin-right:4px;vertical-align:middle}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:12px}
.card{border:1px solid #dde2ea;border-radius:6px;padding:6px;font-size:12px;
overflow-wrap:anywhere}.card img{width:100%;height:auto;display:block;
image-rendering:pixelated;background:#f3f5f9}.card.broken{border-color:#d9534f}
.card .nomap{padding:30px 6px;text-align:center;color:#5b6577;background:#f3f5f9}
.scroll{overflow-x:auto}.rows td{font-size:12px;white-space:nowrap}
.rows td:nth-child(2){white-space:normal;word-break:break-word;min-width:220px}
tr:target{background:#fff4c2}
.yes{color:#b52b27;font-weight:600}
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img.map"), ok = 0;
  imgs.forEach(function (im) {
    if (im.complete && im.naturalWidth > 0) { ok++; }
    else { im.closest(".card").classList.add("broken"); }
  });
  document.body.setAttribute("data-images-loaded", ok);
  document.body.setAttribute("data-images-total", imgs.length);
  if (ok < imgs.length) {
    var n = document.getElementById("missing-maps");
    n.textContent = (imgs.length - ok) + " of " + imgs.length +
      " heatmaps could not be loaded (moved, deleted, or the report was copied without " +
      "its _maps folder).";
    n.hidden = false;
  }
});
"""


def _kpi(label: str, key: str, value: str, group: str | None = None) -> str:
    return (
        f'<div class="kpi"><span class="label">{_e(label)}</span>{_stat(key, value, group)}</div>'
    )


def _render_counts(table: pa.Table, groups: list[Group], summaries: list[dict]) -> str:
    rows = len(table)
    scored = sum(len(g.ok) for g in groups)
    errors = sum(g.errors for g in groups)
    anomalous = sum(g.anomalous for g in groups)
    out = ['<h2 id="counts">Counts</h2><div class="kpis">']
    out.append(_kpi("result rows (images)", "rows", _num(rows)))
    out.append(_kpi("scored", "scored", _num(scored)))
    out.append(_kpi("errors", "errors", _num(errors)))
    out.append(_kpi("anomalous", "anomalous", _num(anomalous)))
    last = summaries[-1] if summaries else None
    if last is not None:
        out.append(_kpi("skipped by the last run", "skipped", _num(int(last.get("skipped", 0)))))
    out.append("</div>")
    if last is None:
        out.append('<p class="meta">No run summaries under _runs/: skipped counts unknown.</p>')
    else:
        out.append(
            "<h3>Runs</h3><table><tr><th>run</th><th>listed</th><th>scored</th>"
            "<th>skipped (had a row)</th><th>errors</th><th>missing</th><th>duplicates</th>"
            "<th>seconds</th></tr>"
        )
        for s in reversed(summaries[-10:]):
            cells = [s.get(k, "") for k in ("images", "scored", "skipped", "errors", "missing")]
            cells += [s.get("duplicates", ""), f"{float(s.get('seconds', 0.0)):.1f}"]
            out.append(
                f"<tr><td>{_e(s['_file'].removesuffix('.json'))}</td>"
                + "".join(f'<td class="r">{_e(c)}</td>' for c in cells)
                + "</tr>"
            )
        out.append("</table>")
        if len(summaries) > 10:
            out.append(f'<p class="meta">{len(summaries)} runs in all; the last 10 shown.</p>')
    if errors:
        reasons: Counter = Counter()
        example: dict[str, str] = {}
        failed = table.filter(pc.is_valid(table.column("error")))  # few rows: loop is fine
        for p, e in zip(_column(failed, "path"), _column(failed, "error"), strict=True):
            r = error_reason(e, p)
            reasons[r] += 1
            example.setdefault(r, p)
        out.append(
            '<h3 id="errors">Errors by reason</h3><table><tr><th>reason</th><th>rows</th>'
            "<th>example</th></tr>"
        )
        for r, n in reasons.most_common():
            out.append(
                f'<tr><td>{_e(r)}</td><td class="r">{_stat("errors:" + r, _num(n))}</td>'
                f"<td>{_e(example[r])}</td></tr>"
            )
        out.append("</table>")
    return "".join(out)


def _render_group(g: Group, gi: int, output: str, top_k: int, inline: bool) -> str:
    key = g.name if g.name is not None else ALL
    title = f"Model {g.name}" if g.name is not None else "Scores"
    out = [f'<section class="model" data-model="{_e(key)}"><h2>{_e(title)}</h2>']
    versions = ", ".join(f"{v} ({n})" for v, n in g.versions.most_common()) or "none"
    out.append(f'<p class="meta">model version: {_e(versions)}</p>')
    rate = g.anomalous / len(g.ok) if len(g.ok) else None
    cal = g.calibration
    out.append('<div class="kpis">')
    out.append(_kpi("scored", "scored", _num(len(g.ok)), key))
    out.append(_kpi("errors", "errors", _num(g.errors), key))
    out.append(_kpi("anomalous", "anomalous", _num(g.anomalous), key))
    out.append(_kpi("anomaly rate", "anomaly_rate", _pct(rate), key))
    expected = cal.expected_rate if cal is not None else None
    out.append(_kpi("expected by calibration", "expected_rate", _pct(expected), key))
    out.append(
        _kpi(
            "threshold",
            "threshold",
            _score(g.threshold) if g.threshold is not None else "none",
            key,
        )
    )
    out.append("</div>")
    if cal is not None and cal.quantile is not None:
        margin = "" if cal.margin in (None, 1.0) else (
            f", widened by threshold_margin {cal.margin:g} (so somewhat fewer are expected)"
        )  # fmt: skip
        out.append(
            f'<p class="meta">The threshold is the {cal.quantile:g} quantile of the held-out '
            f"normal images' scores{_e(margin)}: on normal images about "
            f"{_pct(cal.expected_rate)} score above it. Calibration from {_e(cal.source)}.</p>"
        )
    elif cal is not None:
        out.append(
            f'<p class="meta">Calibration from {_e(cal.source)} does not record the '
            "threshold quantile: expected rate unknown.</p>"
        )
    else:
        out.append(f'<p class="info">Expected rate unknown: {_e(g.calibration_note)}.</p>')
    for note in g.notes:
        out.append(f'<p class="meta">Note: {_e(note)}.</p>')
    if len(g.ok):
        cal_scores = np.asarray(cal.scores) if cal is not None and cal.scores else None
        out.append(histogram_svg(g.scores, g.threshold, cal_scores))
        legend = (
            '<span><i class="sw" style="background:#4a7ab5"></i>tonight, at or below the '
            'threshold</span><span><i class="sw" style="background:#d9534f"></i>tonight, '
            "above the threshold (anomalous)</span>"
        )
        if cal_scores is not None:
            legend += (
                '<span><i class="sw" style="border-top:2px solid #222;height:0"></i>'
                f"calibration images ({cal_scores.size}), scaled to tonight's count</span>"
            )
        out.append(f'<div class="legend">{legend}</div>')
    out.append(_render_drift(g, key))
    if len(g.ok) and top_k > 0:
        out.append(_render_top(g, gi, key, output, top_k, inline))
    out.append("</section>")
    return "".join(out)


def _render_drift(g: Group, key: str) -> str:
    head = "<h3>Drift</h3>"
    test = (
        "Two-sample Kolmogorov-Smirnov test (scipy.stats.ks_2samp) of tonight's "
        "normal-looking image scores (at or below the threshold) against the held-out "
        "calibration images' scores below the same threshold; drift is flagged when "
        f"p &lt; {DRIFT_ALPHA:g} and the statistic D (largest gap between the two CDFs) is at "
        f"least {DRIFT_MIN_STATISTIC:g}."
    )
    if g.calibration is None:
        return head + f'<p class="info">No drift check: {_e(g.calibration_note)}.</p>'
    if not g.calibration.scores:
        return head + (
            f'<p class="info">No drift check: the calibration ({_e(g.calibration.source)}) has '
            "no calibration scores (bundles calibrated by this mspray version store them; "
            "recalibrate with <code>mspray build-bank</code> or retrain).</p>"
        )
    d = g.drift
    if d is None:
        return head + (
            f'<p class="info">No drift check: fewer than {DRIFT_MIN_SAMPLES} normal-looking '
            "scores tonight or in calibration.</p>"
        )
    direction = "higher" if d.night_median > d.calibration_median else "lower"
    figures = (
        f"D = {_stat('drift_statistic', f'{d.statistic:.3f}', key)}, "
        f"p = {_stat('drift_pvalue', f'{d.pvalue:.3g}', key)} "
        f"({d.n_night} images tonight, {d.n_calibration} calibration images; medians "
        f"{d.night_median:.4g} tonight vs {d.calibration_median:.4g})"
    )
    if d.drifted:
        box = (
            f'<div class="warn" data-drift="yes" data-group="{_e(key)}"><b>Drift warning:</b> '
            f"tonight's normal-looking scores are {direction} than on the calibration images. "
            f"{figures}. Images may have changed (lighting, camera, product): check the top "
            "images and consider recalibrating.</div>"
        )
    else:
        box = (
            f'<div class="okbox" data-drift="no" data-group="{_e(key)}">No drift detected: '
            f"{figures}.</div>"
        )
    return f'{head}{box}<p class="meta">{test}</p>'


def _render_top(g: Group, gi: int, key: str, output: str, top_k: int, inline: bool) -> str:
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
                f'<a href="{_e(link)}"><img class="map" src="{_e(src)}" '
                f'alt="heatmap of {_e(row["path"])}"></a>'
            )
        out.append(
            f'<div class="card" data-rank="{r + 1}">{img}<div>#{r + 1} score '
            f"{_stat('top_score', _score(row['image_score']), key)} · {flag} · "
            f'<a href="#{anchor}">row</a></div><div>{_e(row["path"])}</div></div>'
        )
    out.append("</div>")
    cols = ["path", "image_score", "is_anomalous", *score_cols, "threshold", "model_version",
            "scored_at", "map_path"]  # fmt: skip
    out.append('<div class="scroll"><table class="rows"><tr><th>#</th>')
    out.append("".join(f"<th>{_e(c)}</th>" for c in cols) + "<th>part</th></tr>")
    for r, row in enumerate(rows):
        cells = []
        for c in cols:
            v = row.get(c)
            if c == "map_path" and v:  # the full URI is in the link's title
                src = srcs[r] if srcs[r] and not srcs[r].startswith("data:") else None
                text = _e(_basename(v))
                cells.append(
                    f'<td><a href="{_e(src)}" title="{_e(v)}">{text}</a></td>'
                    if src
                    else f'<td title="{_e(v)}">{text}</td>'
                )
                continue
            if isinstance(v, float):
                v = _score(v)
            elif isinstance(v, dt.datetime):
                v = v.isoformat(timespec="seconds")
            cells.append(f"<td>{_e('' if v is None else v)}</td>")
        part = row["_part"]
        out.append(
            f'<tr id="row-{gi}-{r}"><td>{r + 1}</td>{"".join(cells)}'
            f'<td><a href="{_e(quote(part))}">{_e(part)}</a></td></tr>'
        )
    out.append("</table></div>")
    return "".join(out)


def render_report(
    output: str,
    table: pa.Table,
    summaries: list[dict],
    calibrations: Sequence[Calibration] = (),
    top_k: int = 20,
    inline_images: bool = False,
) -> str:
    """The report page of ``table`` (result rows with ``_part``) as one HTML string."""
    cal_by_version: dict[str | None, Calibration] = {}
    for c in calibrations:  # later ones (explicit bundles last) win
        cal_by_version[c.version] = c
    groups = _groups(table, cal_by_version)
    span = "no scored rows"
    if "scored_at" in table.column_names and table.column("scored_at").null_count < len(table):
        first, last = pc.min_max(table.column("scored_at")).values()
        span = (
            f"scored {first.as_py().isoformat(timespec='seconds')} to "
            f"{last.as_py().isoformat(timespec='seconds')}"
        )
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    drifted = [g.name or ALL for g in groups if g.drift is not None and g.drift.drifted]
    banner = ""
    if drifted:
        which = "" if drifted == [ALL] else f" ({_e(', '.join(drifted))})"
        banner = (
            f'<p class="warn"><b>Drift warning</b>{which}: tonight\'s normal-looking scores '
            "moved away from the calibration images' (see below).</p>"
        )
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>mspray report: {_e(output)}</title><style>{_CSS}</style></head><body>",
        "<h1>mspray scoring report</h1>",
        f'<p class="meta">{_e(output)} · {_e(span)} · generated {_e(now)}</p>',
        banner,
        '<p class="warn" id="missing-maps" hidden></p>',
        _render_counts(table, groups, summaries),
    ]
    for gi, g in enumerate(groups):
        body.append(_render_group(g, gi, output, top_k, inline_images))
    body.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(body)


def build_report(
    output_uri: str,
    bundles: Sequence[str] = (),
    top_k: int = 20,
    inline_images: bool = False,
) -> str:
    """(Re)build ``_report.html`` of a scoring output folder from its Parquet rows and run
    summaries; returns the report's URI.

    Args:
        output_uri: scoring output folder (local or ``s3://``).
        bundles: bundles whose calibration (threshold quantile, held-out scores) to compare
            with, matched to the rows by model version; default: the calibration each
            scoring run recorded in its ``_runs/`` summary.
        top_k: how many of the most anomalous images to show per model.
        inline_images: embed the heatmaps as data URIs (one file to mail) instead of
            linking ``_maps/`` beside the report.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    output = storage.normalize(output_uri)
    if not storage.is_dir(output):
        raise FileNotFoundError(f"no such scoring output folder: {output_uri}")
    table = read_rows(output)
    summaries = read_run_summaries(output)
    if not len(table) and not summaries:
        raise FileNotFoundError(f"{output_uri}: no result rows and no run summaries")
    calibrations = _summary_calibrations(summaries)
    calibrations += [calibration_from_bundle(b) for b in bundles]
    page = render_report(output, table, summaries, calibrations, top_k, inline_images)
    uri = storage.join(output, REPORT_NAME)
    storage.write_text(uri, page)
    return uri
