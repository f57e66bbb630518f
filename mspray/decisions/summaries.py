"""Calibration from map summaries: stats and threshold of a detector from normal images.

Calibration needs, per normal image, only the pixel moments of its raw maps and the window
means of its smoothed maps (:class:`MapSummary`, ~1/16 of the maps): the fusion stats come
from the moments and the threshold from the fused window means under those stats, so
images can be summarised anywhere (many Ray actors) and the stats fixed afterwards. The
detector only scores; these functions set its ``stats``, ``threshold`` and the calibration
block of its ``meta``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mspray import maps as M
from mspray.config import MSPrayConfig
from mspray.decisions.threshold import (
    Calibration,
    stats_from_moments,
    threshold_from_config,
    value_moments,
)
from mspray.detector import Detector

log = logging.getLogger(__name__)

#: Held-out normal image scores stored in ``meta["calibration_scores"]`` (bundle meta.json).
MAX_CALIBRATION_SCORES = 1000


def calibrate(
    det: Detector, images: torch.Tensor, batch_size: int | None = None, source: str = "holdout"
) -> Calibration:
    """Per-scale normalisation stats and the image threshold of ``det`` from *normal*
    ``images`` (never test labels), scored against its banks."""
    bs = batch_size or det.cfg.score.batch_size
    raw = [det.raw_scale_maps(images[i : i + bs]) for i in range(0, len(images), bs)]
    return calibrate_from_maps(det, {s: torch.cat([r[s] for r in raw]) for s in det.scales}, source)


def calibrate_from_maps(
    det: Detector, raw: dict[int, torch.Tensor], source: str, batch_size: int | None = None
) -> Calibration:
    """Stats and threshold from raw per-scale maps (``N×H×W`` each) of normal images,
    through their summaries (:func:`summarize_maps`, :func:`calibrate_from_summary`).
    The calibration, with the false-alarm rate it promises, goes into
    ``det.meta["calibration"]``."""
    bs = batch_size or det.cfg.score.batch_size
    n = raw[det.scales[0]].shape[0]
    parts = [
        summarize_maps(det, {s: m[i : i + bs] for s, m in raw.items()}) for i in range(0, n, bs)
    ]
    summary = MapSummary.concat(parts)
    return calibrate_from_summary(
        det, summary.moments, lambda stats: summary_scores(det, summary.pooled, stats), source
    )


def window_grid(cfg: MSPrayConfig) -> tuple[int, int]:
    """Shape of the window-mean grid (eq. 9's windows) of a map at the config's size."""
    size = cfg.model.image_size
    win, st = cfg.model.score_window, cfg.model.score_window_stride
    return tuple(M.window_means(torch.zeros(1, size, size), win, st).shape[1:])


def summarize_maps(det: Detector, raw: dict[int, torch.Tensor]) -> MapSummary:
    """What calibration keeps of raw per-scale maps (``B×H×W``): see :class:`MapSummary`."""
    win, st = det.cfg.model.score_window, det.cfg.model.score_window_stride
    moments = {s: np.stack([value_moments(x) for x in m]) for s, m in raw.items()}
    pooled = {s: M.window_means(det.smooth(m), win, st) for s, m in raw.items()}
    return MapSummary(moments, pooled)


def summary_scores(
    det: Detector, pooled: dict[int, torch.Tensor], stats: dict[int, tuple[float, float]]
) -> torch.Tensor:
    """Fused image scores (eq. 9) from per-scale window means of smoothed raw maps, for
    the fusion ``stats``: equal to :meth:`Detector.predict`'s scores of the same images."""
    use = stats if det.cfg.model.fusion == "zscore" else None
    return M.fuse_maps(pooled, use).flatten(1).amax(dim=1)


def calibrate_from_summary(
    det: Detector,
    moments: dict[int, np.ndarray],
    scores_for: Callable[[dict[int, tuple[float, float]]], np.ndarray | torch.Tensor],
    source: str,
) -> Calibration:
    """Stats from the pixel ``moments`` of normal images (per scale, rows of ``[count,
    sum, sum of squares]``), then the threshold from ``scores_for(stats)``: those
    images' fused scores under the new stats (computed where their summaries are)."""
    det.stats = {s: stats_from_moments(moments[s]) for s in det.scales}
    scores = np.asarray(scores_for(det.stats), dtype=np.float64).ravel()
    cal = threshold_from_config(scores, det.cfg.score, source)
    if cal.warning:
        log.warning("calibration: %s", cal.warning)
    det.threshold = cal.threshold
    det.meta["calibration"] = cal.to_dict()
    # kept in the bundle so a nightly report can compare the night's normal-looking
    # scores with these (drift) and state the expected anomaly rate
    det.meta.pop("threshold_quantile", None)  # the legacy rule's key: the promise replaces it
    det.meta.update(
        threshold_margin=det.cfg.score.threshold_margin,
        calibration_scores=quantile_sketch(scores, MAX_CALIBRATION_SCORES),
    )
    return cal


@dataclass
class MapSummary:
    """What calibration keeps of raw per-scale maps of ``B`` normal images.

    Per scale: the pixel ``moments`` (``B×3``: count, sum, sum of squares, float64) and
    ``pooled``, the window means (eq. 9's windows) of the smoothed map (``B×h×w``). The
    smoothing (rows summing to one), the z-score fusion and the window means are all
    linear, so the fused image score under any stats is the max over windows of
    ``Σ_s (pooled_s − μ_s) / σ_s``: the stats can be fixed after every image has been
    summarised (on many actors), and a summary is ~1/16 of the maps it stands for.
    """

    moments: dict[int, np.ndarray]
    pooled: dict[int, torch.Tensor]

    def take(self, index: np.ndarray) -> MapSummary:
        """The summaries of images ``index`` (in that order)."""
        idx = np.asarray(index, np.int64)
        return MapSummary(
            {s: m[idx] for s, m in self.moments.items()},
            {s: p[torch.from_numpy(idx)] for s, p in self.pooled.items()},
        )

    @staticmethod
    def concat(parts: list[MapSummary]) -> MapSummary:
        scales = parts[0].moments
        return MapSummary(
            {s: np.concatenate([p.moments[s] for p in parts]) for s in scales},
            {s: torch.cat([p.pooled[s] for p in parts]) for s in scales},
        )


def quantile_sketch(values: np.ndarray, cap: int) -> list[float]:
    """``values`` sorted, thinned to at most ``cap`` evenly spaced order statistics (the
    same distribution, bounded size), as floats for JSON."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size > cap:
        v = v[np.linspace(0, v.size - 1, cap).round().astype(int)]
    return [float(x) for x in v]
