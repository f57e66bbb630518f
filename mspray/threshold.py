"""Decision threshold and normalisation stats from held-out NORMAL data only.

Nothing here sees test labels: the paper's F1-max threshold (metrics.f1_max) needs labelled
anomalies, which a deployed detector does not have.
"""

from __future__ import annotations

import numpy as np


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
    arr = _flat_finite(values, "values")
    return float(arr.mean()), float(arr.std())
