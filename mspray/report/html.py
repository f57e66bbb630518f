"""The report page: counts, one section per model (key figures, histogram, drift, top
images), its CSS and script from the files beside this module."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mspray.report.figures import histogram_svg, render_top
from mspray.report.markup import asset, e, kpi, num, pct, score, stat
from mspray.report.reading import Reference
from mspray.report.stats import (
    DRIFT_ALPHA,
    DRIFT_MIN_SAMPLES,
    DRIFT_MIN_STATISTIC,
    Group,
    by_model,
    column,
    error_reason,
)

#: ``data-group`` of the figures of the single group when rows have no ``model`` column.
ALL = "all"


def render_report(
    output: str,
    table: pa.Table,
    summaries: list[dict],
    calibrations: Sequence[Reference] = (),
    top_k: int = 20,
    inline_images: bool = False,
) -> str:
    """The report page of ``table`` (result rows with ``_part``) as one HTML string."""
    cal_by_version: dict[str | None, Reference] = {}
    for c in calibrations:  # later ones (explicit bundles last) win
        cal_by_version[c.version] = c
    groups = by_model(table, cal_by_version)
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
        which = "" if drifted == [ALL] else f" ({e(', '.join(drifted))})"
        banner = (
            f'<p class="warn"><b>Drift warning</b>{which}: tonight\'s normal-looking scores '
            "moved away from the calibration images' (see below).</p>"
        )
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>mspray report: {e(output)}</title>"
        f"<style>{asset('report.css')}</style></head><body>",
        "<h1>mspray scoring report</h1>",
        f'<p class="meta">{e(output)} · {e(span)} · generated {e(now)}</p>',
        banner,
        '<p class="warn" id="missing-maps" hidden></p>',
        _render_counts(table, groups, summaries),
    ]
    for gi, g in enumerate(groups):
        body.append(_render_group(g, gi, output, top_k, inline_images))
    body.append(f"<script>{asset('report.js')}</script></body></html>")
    return "\n".join(body)


def _render_counts(table: pa.Table, groups: list[Group], summaries: list[dict]) -> str:
    rows = len(table)
    scored = sum(len(g.ok) for g in groups)
    errors = sum(g.errors for g in groups)
    anomalous = sum(g.anomalous for g in groups)
    out = ['<h2 id="counts">Counts</h2><div class="kpis">']
    out.append(kpi("result rows (images)", "rows", num(rows)))
    out.append(kpi("scored", "scored", num(scored)))
    out.append(kpi("errors", "errors", num(errors)))
    out.append(kpi("anomalous", "anomalous", num(anomalous)))
    last = summaries[-1] if summaries else None
    if last is not None:
        out.append(kpi("skipped by the last run", "skipped", num(int(last.get("skipped", 0)))))
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
                f"<tr><td>{e(s['_file'].removesuffix('.json'))}</td>"
                + "".join(f'<td class="r">{e(c)}</td>' for c in cells)
                + "</tr>"
            )
        out.append("</table>")
        if len(summaries) > 10:
            out.append(f'<p class="meta">{len(summaries)} runs in all; the last 10 shown.</p>')
    if errors:
        reasons: Counter = Counter()
        example: dict[str, str] = {}
        failed = table.filter(pc.is_valid(table.column("error")))  # few rows: loop is fine
        for p, msg in zip(column(failed, "path"), column(failed, "error"), strict=True):
            r = error_reason(msg, p)
            reasons[r] += 1
            example.setdefault(r, p)
        out.append(
            '<h3 id="errors">Errors by reason</h3><table><tr><th>reason</th><th>rows</th>'
            "<th>example</th></tr>"
        )
        for r, n in reasons.most_common():
            out.append(
                f'<tr><td>{e(r)}</td><td class="r">{stat("errors:" + r, num(n))}</td>'
                f"<td>{e(example[r])}</td></tr>"
            )
        out.append("</table>")
    return "".join(out)


def _render_group(g: Group, gi: int, output: str, top_k: int, inline: bool) -> str:
    key = g.name if g.name is not None else ALL
    title = f"Model {g.name}" if g.name is not None else "Scores"
    out = [f'<section class="model" data-model="{e(key)}"><h2>{e(title)}</h2>']
    versions = ", ".join(f"{v} ({n})" for v, n in g.versions.most_common()) or "none"
    out.append(f'<p class="meta">model version: {e(versions)}</p>')
    rate = g.anomalous / len(g.ok) if len(g.ok) else None
    cal = g.reference
    out.append('<div class="kpis">')
    out.append(kpi("scored", "scored", num(len(g.ok)), key))
    out.append(kpi("errors", "errors", num(g.errors), key))
    out.append(kpi("anomalous", "anomalous", num(g.anomalous), key))
    out.append(kpi("anomaly rate", "anomaly_rate", pct(rate), key))
    expected = cal.expected_rate if cal is not None else None
    out.append(kpi("expected by calibration", "expected_rate", pct(expected), key))
    out.append(
        kpi(
            "threshold",
            "threshold",
            score(g.threshold) if g.threshold is not None else "none",
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
            f"normal images' scores{e(margin)}: on normal images about "
            f"{pct(cal.expected_rate)} score above it. Calibration from {e(cal.source)}.</p>"
        )
    elif cal is not None:
        out.append(
            f'<p class="meta">Calibration from {e(cal.source)} does not record the '
            "threshold quantile: expected rate unknown.</p>"
        )
    else:
        out.append(f'<p class="info">Expected rate unknown: {e(g.calibration_note)}.</p>')
    for note in g.notes:
        out.append(f'<p class="meta">Note: {e(note)}.</p>')
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
        out.append(render_top(g, gi, key, output, top_k, inline))
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
    if g.reference is None:
        return head + f'<p class="info">No drift check: {e(g.calibration_note)}.</p>'
    if not g.reference.scores:
        return head + (
            f'<p class="info">No drift check: the calibration ({e(g.reference.source)}) has '
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
        f"D = {stat('drift_statistic', f'{d.statistic:.3f}', key)}, "
        f"p = {stat('drift_pvalue', f'{d.pvalue:.3g}', key)} "
        f"({d.n_night} images tonight, {d.n_calibration} calibration images; medians "
        f"{d.night_median:.4g} tonight vs {d.calibration_median:.4g})"
    )
    if d.drifted:
        box = (
            f'<div class="warn" data-drift="yes" data-group="{e(key)}"><b>Drift warning:</b> '
            f"tonight's normal-looking scores are {direction} than on the calibration images. "
            f"{figures}. Images may have changed (lighting, camera, product): check the top "
            "images and consider recalibrating.</div>"
        )
    else:
        box = (
            f'<div class="okbox" data-drift="no" data-group="{e(key)}">No drift detected: '
            f"{figures}.</div>"
        )
    return f'{head}{box}<p class="meta">{test}</p>'
