"""Decision threshold and normalisation stats from held-out NORMAL data only.

Nothing here sees test labels: the paper's F1-max threshold (metrics.f1_max) needs labelled
anomalies, which a deployed detector does not have.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import beta, betabinom

if TYPE_CHECKING:
    from mspray.config import ScoreConfig


def _flat_finite(values, name: str) -> np.ndarray:
    # torch tensors (CPU or not) and lists alike; float64 so means of millions of pixels
    # do not lose precision.
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def calibrate_threshold(normal_scores, quantile: float = 0.99, margin: float = 1.0) -> float:
    """Image-score threshold: the ``quantile`` of normal image scores, widened by ``margin``.

    With ``q`` the quantile, returns ``q + (margin - 1) * |q|``: ``q * margin`` for
    ``q >= 0``, and for negative ``q`` (possible with z-scored maps) ``margin > 1`` still
    moves the threshold up, i.e. further from the normal scores, never below them.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be finite and >= 0, got {margin}")
    q = float(np.quantile(_flat_finite(normal_scores, "normal_scores"), quantile))
    return q + (margin - 1.0) * abs(q)


def score_stats(values) -> tuple[float, float]:
    """``(mean, std)`` (population std) of normal map values, for z-score fusion."""
    return stats_from_moments(value_moments(values))


def value_moments(values) -> np.ndarray:
    """``[count, sum, sum of squares]`` (float64) of finite values: what :func:`score_stats`
    needs, additive over any split of the values (images scored on many actors)."""
    arr = _flat_finite(values, "values").astype(np.float64)
    return np.array([arr.size, arr.sum(), np.square(arr).sum()])


def stats_from_moments(moments) -> tuple[float, float]:
    """``(mean, std)`` from ``[count, sum, sum of squares]`` rows (summed over rows)."""
    count, total, squares = np.asarray(moments, np.float64).reshape(-1, 3).sum(0)
    if count == 0:
        raise ValueError("values: no values")
    mean = total / count
    return float(mean), float(np.sqrt(max(squares / count - mean * mean, 0.0)))


# ---------------------------------------------------------------------------- order statistics
#
# For n i.i.d. continuous calibration scores and the k-th smallest of them, X_(k), the false
# alarm rate of the threshold X_(k) on a NEW normal image, FPR = P(new > X_(k)) = 1 - F(X_(k)),
# is distributed Beta(n + 1 - k, k) whatever the score distribution is (F(X_(k)) is the k-th
# order statistic of n uniforms). So the threshold promises FPR with mean (n + 1 - k)/(n + 1)
# and a Clopper-Pearson-like interval from the Beta quantiles; the number of false alarms
# among m new normal images is Beta-Binomial(m, n + 1 - k, k).


@dataclass(frozen=True)
class Calibration:
    """A threshold and the false-alarm rate it promises on new normal images.

    ``rank`` is the number of calibration scores at or below the threshold. The promise is
    exact (a Beta distribution) when the threshold is one of the calibration scores; between
    two of them (legacy quantile, margin) the interval covers both neighbours.
    """

    threshold: float
    n: int  # calibration scores
    rank: int  # calibration scores <= threshold
    promised_fpr: float  # expected false-alarm rate on new normal images
    fpr_interval: tuple[float, float]  # ``confidence`` interval of that rate
    confidence: float
    method: str  # "order_statistic" | "quantile" | "trimmed"
    target_fpr: float | None = None
    warning: str | None = None
    source: str | None = None  # where the scores came from: "crossfit", "holdout", ...
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict (meta.json, /v1/model, evaluate JSON)."""
        d = asdict(self)
        d["fpr_interval"] = list(self.fpr_interval)
        d.update(d.pop("extra"))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """The inverse of :meth:`to_dict` (keys that are not fields go back to ``extra``).
        KeyError when a field without a default is missing."""
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        known["fpr_interval"] = tuple(known["fpr_interval"])
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    def expected_flags(self, m: int) -> tuple[int, int]:
        """``confidence`` interval of the number of false alarms among ``m`` new normal
        images (Beta-Binomial predictive distribution; checks an observed rate)."""
        return expected_flags(self.to_dict(), m)

    @property
    def _exact(self) -> bool:
        return bool(self.extra.get("exact", True))


def _beta_params(n: int, k: int) -> tuple[int, int]:
    return n + 1 - k, k  # FPR of X_(k) ~ Beta(a, b)


def fpr_interval(
    n: int, k: int, confidence: float = 0.95, exact: bool = True
) -> tuple[float, float]:
    """Interval of the false-alarm rate of a threshold with ``k`` of ``n`` calibration scores
    at or below it. ``exact``: the threshold is X_(k); else it lies in [X_(k), X_(k+1))."""
    alpha = 1.0 - confidence
    # upper end: the threshold is no lower than X_(k) (FPR(X_(0)) = 1)
    hi = 1.0 if k == 0 else float(beta.ppf(1 - alpha / 2, *_beta_params(n, k)))
    # lower end: no higher than X_(k) (exact) or X_(k+1) (FPR(X_(n+1)) = 0)
    k_lo = k if exact else k + 1
    lo = 0.0 if k_lo > n or k_lo == 0 else float(beta.ppf(alpha / 2, *_beta_params(n, k_lo)))
    return lo, hi


def flag_count_interval(
    n: int, k: int, m: int, confidence: float = 0.95, exact: bool = True
) -> tuple[int, int]:
    """``confidence`` interval of the number of false alarms among ``m`` new normal images
    (Beta-Binomial, the sampling noise of the m images included)."""
    alpha = 1.0 - confidence
    hi = m if k == 0 else int(betabinom.ppf(1 - alpha / 2, m, *_beta_params(n, k)))
    k_lo = k if exact else k + 1
    lo = 0 if k_lo > n or k_lo == 0 else int(betabinom.ppf(alpha / 2, m, *_beta_params(n, k_lo)))
    return lo, hi


def min_calibration_images(target_fpr: float) -> int:
    """Fewest calibration scores for which some order statistic promises ``target_fpr`` on
    average: (n + 1) * target >= 1."""
    return max(1, math.ceil(1.0 / target_fpr) - 1)


def order_statistic_rank(n: int, target_fpr: float) -> int:
    """Smallest k whose X_(k) promises at most ``target_fpr`` on average, capped at n."""
    return int(min(n, max(1, math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9))))


def promise(
    scores,
    threshold: float,
    confidence: float = 0.95,
    method: str = "order_statistic",
    target_fpr: float | None = None,
    source: str | None = None,
) -> Calibration:
    """What ``threshold`` promises, given the normal calibration ``scores``."""
    arr = _flat_finite(scores, "scores")
    n, k = arr.size, int((arr <= threshold).sum())
    exact = bool(np.any(arr == threshold))
    a, _ = _beta_params(n, k)
    # X_(k) promises a/(n+1) on average; between X_(k) and X_(k+1), the mean of the two
    mean = (a - (0.0 if exact else 0.5)) / (n + 1)
    warning = None
    if target_fpr is not None and n < min_calibration_images(target_fpr):
        warning = (
            f"{n} calibration images cannot promise a false-alarm rate of {target_fpr:g}: "
            f"even their maximum promises {1 / (n + 1):.3g}; use at least "
            f"{min_calibration_images(target_fpr)} normal images (or a larger target_fpr)"
        )
    return Calibration(
        threshold=float(threshold),
        n=n,
        rank=k,
        promised_fpr=float(mean),
        fpr_interval=fpr_interval(n, k, confidence, exact),
        confidence=confidence,
        method=method,
        target_fpr=target_fpr,
        warning=warning,
        source=source,
        extra={"exact": exact},
    )


def order_statistic_threshold(
    normal_scores,
    target_fpr: float = 0.01,
    confidence: float = 0.95,
    margin: float = 1.0,
    source: str | None = None,
) -> Calibration:
    """Threshold = the k-th smallest normal score, k the smallest rank whose promised mean
    false-alarm rate is <= ``target_fpr`` (the maximum when n is too small, with a warning).
    ``margin`` widens it like :func:`calibrate_threshold`; the promise is then recomputed."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be finite and >= 0, got {margin}")
    arr = np.sort(_flat_finite(normal_scores, "normal_scores"))
    t = float(arr[order_statistic_rank(arr.size, target_fpr) - 1])
    t = t + (margin - 1.0) * abs(t)
    return promise(arr, t, confidence, "order_statistic", target_fpr, source)


def trimmed_threshold(
    scores,
    anomaly_rate: float,
    target_fpr: float = 0.01,
    confidence: float = 0.95,
    source: str | None = None,
) -> Calibration:
    """Threshold from scores of which at most a fraction ``anomaly_rate`` are anomalous.

    The ``A = ceil(anomaly_rate * N)`` highest scores are taken as the anomalies and the
    order statistic for ``target_fpr`` is taken among the other ``N - A``. The promise
    assumes that; its interval also covers the other extremes (no anomaly at all, or all A
    anomalies scoring low), so it stays honest whatever the A anomalies do.
    """
    if not 0.0 <= anomaly_rate < 1.0:
        raise ValueError(f"expected anomaly rate must be in [0, 1), got {anomaly_rate}")
    arr = np.sort(_flat_finite(scores, "scores"))
    big_n = arr.size
    n_anom = math.ceil(anomaly_rate * big_n)
    n0 = big_n - n_anom
    if n0 < 1:
        raise ValueError(f"{big_n} scores with {n_anom} anomalous leave no normal one")
    base = order_statistic_threshold(arr[:n0], target_fpr, confidence, source=source)
    k = base.rank
    alpha = 1.0 - confidence
    # no anomaly: k of N normal scores below; all A anomalies low: k - A of n0 normals below
    lo = base.fpr_interval[0]
    k_worst = max(k - n_anom, 0)
    hi = 1.0 if k_worst == 0 else float(beta.ppf(1 - alpha / 2, *_beta_params(n0, k_worst)))
    hi = max(hi, float(beta.ppf(1 - alpha / 2, *_beta_params(big_n, k))))
    return Calibration(
        threshold=base.threshold,
        n=n0,
        rank=k,
        promised_fpr=base.promised_fpr,
        fpr_interval=(lo, hi),
        confidence=confidence,
        method="trimmed",
        target_fpr=target_fpr,
        warning=base.warning,
        source=source,
        extra={"exact": True, "n_scores": big_n, "assumed_anomalies": n_anom},
    )


def threshold_from_config(
    normal_scores, score_cfg: ScoreConfig, source: str | None = None
) -> Calibration:
    """The configured rule: ``score.threshold_quantile`` when set (legacy bundles and
    configs), else the order statistic for ``score.target_fpr``."""
    q, margin, conf = (
        score_cfg.threshold_quantile,
        score_cfg.threshold_margin,
        score_cfg.fpr_confidence,
    )
    if q is not None:
        t = calibrate_threshold(normal_scores, q, margin)
        return promise(normal_scores, t, conf, "quantile", 1.0 - q, source)
    return order_statistic_threshold(normal_scores, score_cfg.target_fpr, conf, margin, source)


def expected_flags(calibration: dict, m: int) -> tuple[int, int]:
    """Interval of the false-alarm count among ``m`` new normal images that a stored
    calibration (``meta["calibration"]``) predicts; for a trimmed recalibration it also
    covers the extremes its promise allows (no anomaly in the batch, or all of them low)."""
    n, k = int(calibration["n"]), int(calibration["rank"])
    conf = float(calibration.get("confidence", 0.95))
    lo, hi = flag_count_interval(n, k, m, conf, bool(calibration.get("exact", True)))
    suspect = int(calibration.get("suspect_scores") or 0)
    if suspect:  # a widened promise (:func:`widen_promise`): those scores may all sit low
        hi = max(hi, flag_count_interval(n, max(k - suspect, 0), m, conf)[1])
    n_anom = int(calibration.get("assumed_anomalies") or 0)
    if n_anom:
        hi = max(
            hi,
            flag_count_interval(n, max(k - n_anom, 0), m, conf)[1],  # anomalies scored low
            flag_count_interval(n + n_anom, k, m, conf)[1],  # no anomaly at all
        )
    return lo, hi


def widen_promise(cal: Calibration, suspect: int, why: str) -> Calibration:
    """``cal``'s promise widened for ``suspect`` calibration scores that may be too low (the
    images' near-duplicates could not be kept out of the bank they were scored against):
    in the worst case all of them sit at or below the threshold while a new image's score
    would not, so the threshold may be only the ``rank - suspect``-th of the valid scores.
    The promised rate and the interval's upper end take that worst case; ``why`` goes to
    the warning and ``meta.json`` (``widened``)."""
    if suspect <= 0:
        return cal
    k = max(cal.rank - suspect, 0)
    a, _ = _beta_params(cal.n, k)
    hi = fpr_interval(cal.n, k, cal.confidence)[1]
    note = (
        f"promise widened from {cal.promised_fpr:.3g} [{cal.fpr_interval[0]:.3g}, "
        f"{cal.fpr_interval[1]:.3g}] to {a / (cal.n + 1):.3g} [{cal.fpr_interval[0]:.3g}, "
        f"{hi:.3g}]: {suspect} of {cal.n} calibration scores may be too low ({why})"
    )
    return replace(
        cal,
        promised_fpr=max(cal.promised_fpr, a / (cal.n + 1)),
        fpr_interval=(cal.fpr_interval[0], max(cal.fpr_interval[1], hi)),
        warning="; ".join(w for w in (cal.warning, note) if w),
        extra={**cal.extra, "suspect_scores": int(suspect), "widened": note},
    )
