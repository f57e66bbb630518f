"""Detector: trained encoders + per-scale banks + calibration -> anomaly maps and scores.

This is the object a model bundle loads into, and what batch scoring and Serve call. Each
scale's patch score is the distance to the nearest training patch embedding (eq. 6), spread
to pixels by averaging over covering patches (eq. 7); scale maps are fused (eq. 8) and the
image score is the maximum 8×8 window mean of the fused map (eq. 9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mspray import maps as M
from mspray.bank import PatchBank
from mspray.config import MSPrayConfig
from mspray.model.detector import MultiScaleDetector
from mspray.threshold import Calibration, score_stats, threshold_from_config


@dataclass
class Prediction:
    """Scores for a batch of ``B`` images of size ``H×W`` (the config's image size)."""

    image_scores: torch.Tensor  # B
    maps: torch.Tensor  # B×H×W fused (and smoothed) anomaly map
    scale_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # scale -> B
    scale_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # scale -> B×H×W raw
    is_anomalous: torch.Tensor | None = None  # B bool, when a threshold is set


class Detector:
    """Scores images against the banks of normal patch embeddings of every scale."""

    def __init__(
        self,
        cfg: MSPrayConfig,
        model: MultiScaleDetector,
        banks: dict[int, PatchBank] | None = None,
        stats: dict[int, tuple[float, float]] | None = None,
        threshold: float | None = None,
        meta: dict | None = None,
        device: str | torch.device = "cpu",
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.banks: dict[int, PatchBank] = dict(banks or {})
        self.stats = dict(stats or {})
        self.threshold = threshold
        self.meta: dict = dict(meta or {})

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(self.cfg.model.scales)

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unversioned"))

    # ------------------------------------------------------------------ banks
    def bank_stride(self, scale: int) -> int:
        return self.cfg.bank.bank_stride or self.model.encoder(scale).stride

    @torch.no_grad()
    def bank_embeddings(self, images: torch.Tensor, scale: int) -> np.ndarray:
        """All training patch embeddings of ``images`` at the bank stride, ``N×D`` float32."""
        grid = self.model.embed(images.to(self.device), scale, self.bank_stride(scale))
        return grid.reshape(-1, grid.shape[-1]).float().cpu().numpy()

    def build_banks(
        self, images: torch.Tensor, batch_size: int | None = None, progress: bool = False
    ) -> None:
        """Banks of every scale from normal ``images`` (``N×3×H×W`` in [0, 1])."""
        from tqdm.auto import tqdm

        bs = batch_size or self.cfg.score.batch_size
        for scale in tqdm(self.scales, desc="banks", disable=not progress):
            emb = np.concatenate(
                [
                    self.bank_embeddings(images[i : i + bs], scale)
                    for i in range(0, images.shape[0], bs)
                ]
            )
            self.banks[scale] = PatchBank.build(emb, self.cfg.bank, seed=self.cfg.train.seed)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def scale_map(
        self, images: torch.Tensor, scale: int, bank: PatchBank | None = None
    ) -> torch.Tensor:
        """Pixel map of nearest-neighbour distances at one scale (``B×H×W``, on CPU),
        against ``bank`` (default: the detector's bank of that scale)."""
        bank = bank if bank is not None else self.banks[scale]
        images = images.to(self.device, torch.float32)
        grid = self.model.embed(images, scale)  # B×h×w×D
        b, h, w, d = grid.shape
        dist = bank.search(grid.reshape(-1, d))
        scores = torch.from_numpy(np.asarray(dist, dtype=np.float32)).view(b, h, w)
        return M.patch_scores_to_map(
            scores, scale, self.cfg.stride_for(scale), tuple(images.shape[-2:])
        )

    def raw_scale_maps(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per-scale pixel maps of nearest-neighbour distances (``B×H×W`` each, on CPU)."""
        missing = [s for s in self.scales if s not in self.banks]
        if missing:
            raise RuntimeError(f"no bank for scale(s) {missing}; build or load banks first")
        return {scale: self.scale_map(images, scale) for scale in self.scales}

    def _finish(self, m: torch.Tensor) -> torch.Tensor:
        return M.gaussian_smooth(m, self.cfg.model.smoothing_sigma)

    def predict(self, images: torch.Tensor) -> Prediction:
        """Maps and scores of ``B×3×H×W`` images in [0, 1] (already at the config's size)."""
        raw = self.raw_scale_maps(images)
        stats = self.stats if self.cfg.model.fusion == "zscore" and self.stats else None
        fused = self._finish(M.fuse_maps(raw, stats))
        win, st = self.cfg.model.score_window, self.cfg.model.score_window_stride
        scores = M.image_scores(fused, win, st)
        scale_scores = {s: M.image_scores(self._finish(m), win, st) for s, m in raw.items()}
        flags = None if self.threshold is None else scores > self.threshold
        return Prediction(scores, fused, scale_scores, raw, flags)

    def calibrate(
        self, images: torch.Tensor, batch_size: int | None = None, source: str = "holdout"
    ) -> Calibration:
        """Per-scale normalisation stats and the image threshold from held-out *normal*
        images (never test labels), scored against the detector's banks."""
        bs = batch_size or self.cfg.score.batch_size
        raw = [self.raw_scale_maps(images[i : i + bs]) for i in range(0, len(images), bs)]
        return self.calibrate_from_maps(
            {s: torch.cat([r[s] for r in raw]) for s in self.scales}, source
        )

    def calibrate_from_maps(
        self, raw: dict[int, torch.Tensor], source: str, batch_size: int | None = None
    ) -> Calibration:
        """Stats and threshold from raw per-scale maps (``N×H×W`` each) of normal images
        (see :mod:`mspray.calibration` for maps from fold banks). The calibration, with the
        false-alarm rate it promises, goes into ``meta["calibration"]``."""
        import logging

        self.stats = {s: score_stats(raw[s].flatten().numpy()) for s in self.scales}
        stats = self.stats if self.cfg.model.fusion == "zscore" else None
        bs = batch_size or self.cfg.score.batch_size
        n = raw[self.scales[0]].shape[0]
        win, st = self.cfg.model.score_window, self.cfg.model.score_window_stride
        scores = torch.cat(
            [
                M.image_scores(
                    self._finish(M.fuse_maps({s: m[i : i + bs] for s, m in raw.items()}, stats)),
                    win,
                    st,
                )
                for i in range(0, n, bs)
            ]
        )
        cal = threshold_from_config(scores.numpy(), self.cfg.score, source)
        if cal.warning:
            logging.getLogger(__name__).warning("calibration: %s", cal.warning)
        self.threshold = cal.threshold
        self.meta["calibration"] = cal.to_dict()
        return cal
