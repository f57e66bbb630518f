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
from mspray.model.multiscale import MultiScaleEncoder
from mspray.threshold import calibrate_threshold, score_stats

#: Held-out normal image scores stored in ``meta["calibration_scores"]`` (bundle meta.json).
MAX_CALIBRATION_SCORES = 1000


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
        model: MultiScaleEncoder,
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
    def raw_scale_maps(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per-scale pixel maps of nearest-neighbour distances (``B×H×W`` each, on CPU)."""
        missing = [s for s in self.scales if s not in self.banks]
        if missing:
            raise RuntimeError(f"no bank for scale(s) {missing}; build or load banks first")
        images = images.to(self.device, torch.float32)
        out = {}
        for scale in self.scales:
            grid = self.model.embed(images, scale)  # B×h×w×D
            b, h, w, d = grid.shape
            dist = self.banks[scale].search(grid.reshape(-1, d))
            scores = torch.from_numpy(np.asarray(dist, dtype=np.float32)).view(b, h, w)
            out[scale] = M.patch_scores_to_map(
                scores, scale, self.cfg.stride_for(scale), tuple(images.shape[-2:])
            )
        return out

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

    def calibrate(self, images: torch.Tensor, batch_size: int | None = None) -> None:
        """Per-scale normalisation stats and the image threshold from held-out *normal*
        images (never test labels). Their image scores (thinned to
        :data:`MAX_CALIBRATION_SCORES`) and the quantile go into :attr:`meta`."""
        bs = batch_size or self.cfg.score.batch_size
        raw = [self.raw_scale_maps(images[i : i + bs]) for i in range(0, len(images), bs)]
        self.stats = {
            s: score_stats(torch.cat([r[s] for r in raw]).flatten().numpy()) for s in self.scales
        }
        stats = self.stats if self.cfg.model.fusion == "zscore" else None
        fused = torch.cat([self._finish(M.fuse_maps(r, stats)) for r in raw])
        scores = M.image_scores(
            fused, self.cfg.model.score_window, self.cfg.model.score_window_stride
        )
        q, margin = self.cfg.score.threshold_quantile, self.cfg.score.threshold_margin
        self.threshold = calibrate_threshold(scores.numpy(), q, margin)
        # kept in the bundle so a nightly report can compare the night's normal-looking
        # scores with these (drift) and state the expected anomaly rate
        self.meta.update(
            threshold_quantile=q,
            threshold_margin=margin,
            calibration_scores=quantile_sketch(scores.numpy(), MAX_CALIBRATION_SCORES),
        )


def quantile_sketch(values: np.ndarray, cap: int) -> list[float]:
    """``values`` sorted, thinned to at most ``cap`` evenly spaced order statistics (the
    same distribution, bounded size), as floats for JSON."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size > cap:
        v = v[np.linspace(0, v.size - 1, cap).round().astype(int)]
    return [float(x) for x in v]
