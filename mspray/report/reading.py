"""What the report reads: the result rows, and the calibration each model version's rows are
compared with (from the bundles given, or the block each scoring run wrote into its
``_runs/`` summary)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mspray import storage
from mspray.artifacts.output import RUNS_DIR, read_results
from mspray.decisions.threshold import Calibration, fpr_interval

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reference:
    """What the rows of one model version are compared with: the bundle's calibration (its
    threshold and the false-alarm rate that promises), the held-out normal scores and
    ``threshold_margin`` it recorded, and where the report learned them (``source``)."""

    version: str | None
    calibration: Calibration | None = None
    threshold: float | None = None
    margin: float | None = None
    scores: list[float] | None = None
    source: str = ""

    @property
    def expected_rate(self) -> float | None:
        """Fraction of normal images expected above the threshold (None: not recorded)."""
        return None if self.calibration is None else self.calibration.promised_fpr

    @property
    def quantile(self) -> float | None:
        """The quantile of normal scores the threshold is, ``1 - expected_rate``."""
        rate = self.expected_rate
        return None if rate is None else 1.0 - rate

    def to_dict(self) -> dict:
        """JSON form, as stored in a run summary's ``calibration`` block (the flat keys are
        what reports of earlier mspray versions read)."""
        return {
            "version": self.version,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "margin": self.margin,
            "scores": self.scores,
            "source": self.source,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict, source: str) -> Reference:
        """Read a run summary's ``calibration`` block (``source``: where it was found)."""
        scores = [float(s) for s in d["scores"]] if d.get("scores") else None
        threshold = _float_or_none(d.get("threshold"))
        cal = None
        if isinstance(d.get("calibration"), dict):
            cal = _calibration(d["calibration"])
        if cal is None:  # blocks written before they carried the calibration itself
            cal = _quantile_calibration(threshold, _float_or_none(d.get("quantile")), scores)
        return cls(
            version=d.get("version"),
            calibration=cal,
            threshold=threshold,
            margin=_float_or_none(d.get("margin")),
            scores=scores,
            source=d.get("source") or source,
        )


def _float_or_none(x) -> float | None:
    return None if x is None else float(x)


def _calibration(d: dict) -> Calibration | None:
    try:
        return Calibration.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        log.warning("ignoring a calibration record without %s", e)
        return None


def _quantile_calibration(
    threshold: float | None, quantile: float | None, scores: list[float] | None
) -> Calibration | None:
    """The calibration of a bundle that recorded only its threshold and the quantile of
    normal scores it is: that quantile promises ``1 - quantile`` false alarms (the interval
    from the stored scores, a sketch of the held-out ones)."""
    if threshold is None or quantile is None:
        return None
    arr = np.asarray(scores or [], np.float64)
    n, k = int(arr.size), int((arr <= threshold).sum())
    return Calibration(
        threshold=threshold,
        n=n,
        rank=k,
        promised_fpr=1.0 - quantile,
        fpr_interval=fpr_interval(n, k, exact=False),
        confidence=0.95,
        method="quantile",
        target_fpr=1.0 - quantile,
    )


def calibration_from_bundle(bundle: str) -> Reference:
    """The calibration recorded in a bundle's ``meta.json`` (``meta["calibration"]``; for
    bundles calibrated before that was stored, the threshold quantile and margin, which
    fall back to its ``config.json``)."""
    from mspray.artifacts.bundle import read_config, read_meta

    meta = read_meta(bundle)
    threshold = _float_or_none(meta.get("threshold"))
    scores = meta.get("calibration_scores")
    scores = [float(s) for s in scores] if scores else None
    margin = meta.get("threshold_margin")
    cal = _calibration(meta["calibration"]) if isinstance(meta.get("calibration"), dict) else None
    if cal is None:  # a bundle calibrated before the promise was stored
        quantile = meta.get("threshold_quantile")
        if quantile is None:
            score_cfg = read_config(bundle).score
            quantile, margin = score_cfg.threshold_quantile, score_cfg.threshold_margin
        cal = _quantile_calibration(threshold, _float_or_none(quantile), scores)
    return Reference(
        version=meta.get("version"),
        calibration=cal,
        threshold=threshold,
        margin=_float_or_none(margin),
        scores=scores,
        source=f"bundle {storage.normalize(bundle)}",
    )


def summary_calibrations(summaries: list[dict]) -> list[Reference]:
    """The calibration blocks of run summaries (one per run, or a list per run)."""
    out = []
    for s in summaries:
        block = s.get("calibration")
        blocks = block if isinstance(block, list) else [block] if isinstance(block, dict) else []
        out.extend(Reference.from_dict(b, f"run summary {RUNS_DIR}/{s['_file']}") for b in blocks)
    return out


def read_rows(output: str) -> pa.Table:
    """Every result row of ``output`` (all columns) plus ``_part``, its part's file name."""
    return read_results(output, with_part=True)
