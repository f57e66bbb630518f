"""The nightly report: one HTML page next to a scoring output's Parquet rows.

:func:`build_report` reads a scoring output folder (local or ``s3://``; layout in
:mod:`mspray.artifacts.output`) and writes ``OUTPUT/_report.html``:

- counts: result rows, scored, errors by reason, anomalous; the last run's listed / scored /
  skipped images from its ``_runs/`` summary;
- per model (the ``model`` column when there is one, else all rows): an inline SVG histogram
  of the image scores with the threshold, the anomaly rate next to what calibration expects
  (the false-alarm rate the bundle's threshold promises), and a drift check: a two-sample
  Kolmogorov-Smirnov test of the night's normal-looking scores against the bundle's
  held-out calibration scores, both cut at the threshold;
- the top-k most anomalous images with their heatmap panels and their rows.

The page is self-contained: inline CSS and SVG, heatmaps linked relatively (``_maps/...``,
beside the report) or inlined as data URIs. Calibration comes from the bundles passed in
(``meta.json``) or from the ``calibration`` block the scoring job writes into its run
summary, matched to the rows by model version.

Modules: :mod:`~mspray.report.reading` (rows and calibrations), :mod:`~mspray.report.stats`
(groups, error reasons, drift), :mod:`~mspray.report.html` and
:mod:`~mspray.report.figures` (the page; ``report.css`` and ``report.js`` beside them).
This package is core: it imports no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

from mspray import storage
from mspray.artifacts.output import REPORT_NAME, read_run_summaries
from mspray.report.html import ALL, render_report
from mspray.report.reading import (
    Reference,
    calibration_from_bundle,
    read_rows,
    summary_calibrations,
)
from mspray.report.stats import error_reason

__all__ = [
    "ALL",
    "REPORT_NAME",
    "Reference",
    "build_report",
    "calibration_from_bundle",
    "error_reason",
    "read_rows",
    "render_report",
]


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
        bundles: bundles whose calibration (threshold, promised false-alarm rate, held-out
            scores) to compare with, matched to the rows by model version; default: the
            calibration each scoring run recorded in its ``_runs/`` summary.
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
    references = summary_calibrations(summaries)
    references += [calibration_from_bundle(b) for b in bundles]
    page = render_report(output, table, summaries, references, top_k, inline_images)
    uri = storage.join(output, REPORT_NAME)
    storage.write_text(uri, page)
    return uri
