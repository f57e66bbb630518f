"""The report's statistics: the rows grouped by model, their counts, the error reasons, and
the drift test of the night's scores against the calibration's."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mspray.report.reading import Reference

#: Drift is flagged when the KS test rejects at this level AND the distributions differ by
#: at least DRIFT_MIN_STATISTIC (largest CDF gap): with thousands of images a night, p alone
#: flags shifts too small to matter.
DRIFT_ALPHA = 0.01
DRIFT_MIN_STATISTIC = 0.1
#: Fewer normal-looking scores than this on either side: no drift test.
DRIFT_MIN_SAMPLES = 5


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
    reference: Reference | None = None  # its calibration
    calibration_note: str = ""
    drift: Drift | None = None
    notes: list[str] = field(default_factory=list)


def column(table: pa.Table, name: str) -> list:
    """A column's values (all None when the table has no such column)."""
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [None] * len(table)


def counts(table: pa.Table, name: str) -> Counter:
    """Non-null values of a column and how often each occurs."""
    if name not in table.column_names or not len(table):
        return Counter()
    vc = pc.value_counts(table.column(name).drop_null()).to_pylist()
    return Counter({d["values"]: d["counts"] for d in vc})


def group(name: str | None, rows: pa.Table, calibrations: dict[str | None, Reference]) -> Group:
    """The figures of one model's ``rows``, compared with the calibration of their (most
    common) model version."""
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
    versions = counts(good, "model_version")
    thresholds = counts(rows, "threshold")
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
        g.reference = cal
        if g.threshold is None:
            g.threshold = cal.threshold
    if cal is not None and cal.scores and g.threshold is not None and g.scores.size:
        g.drift = drift_test(g.scores, np.asarray(cal.scores), g.threshold)
    return g


def by_model(table: pa.Table, calibrations: dict[str | None, Reference]) -> list[Group]:
    """One group per value of the ``model`` column (nulls last), or one for all rows (no
    such column, or a single-bundle run's column of nulls)."""
    if "model" not in table.column_names or table.column("model").null_count == len(table):
        return [group(None, table, calibrations)]
    model = table.column("model")
    out = [
        group(str(name), table.filter(pc.equal(model, name)), calibrations)
        for name in sorted(counts(table, "model"), key=str)
    ]
    if model.null_count:
        out.append(group("(no model)", table.filter(pc.is_null(model)), calibrations))
    return out
