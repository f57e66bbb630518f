"""Score images from an :mod:`mspray.onnx.export` directory with numpy, ONNX Runtime and faiss.

No torch, no Ray: this module (and the ``mspray`` and ``mspray.onnx`` packages) imports
neither, so a consumer needs ``numpy pillow onnxruntime faiss-cpu`` and the exported files.
It reproduces :meth:`mspray.detector.Detector.predict`: per scale the encoder grid at the inference
stride, the min L2 distance to the bank (eq. 6), the mean over covering patches (eq. 7),
z-score fusion (eq. 8), Gaussian smoothing and the max window mean (eq. 9). Every step is a
small dense matrix product or a cumulative sum, vectorised over the batch.

    python -m mspray.onnx.runtime DIR image.png [more.png ...]   # prints JSON lines
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

SPEC_FILE = "mspray_export.json"


def load_rgb(path: str, size: int) -> np.ndarray:
    """Decode an image file to ``3×size×size`` float32 in [0, 1] (PIL antialiased bilinear
    resize per channel; equal to mspray's loader when the image already has that size)."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    if rgb.shape[:2] != (size, size):
        rgb = np.stack(
            [
                np.asarray(
                    Image.fromarray(rgb[..., c], mode="F").resize((size, size), Image.BILINEAR)
                )
                for c in range(3)
            ],
            axis=-1,
        ).clip(0.0, 1.0)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)


def _cover_matrix(side: int, patch: int, stride: int) -> np.ndarray:
    """``side×n`` 0/1 matrix: pixel y is covered by patch i (top edge at ``i*stride``)."""
    n = (side - patch) // stride + 1
    y = np.arange(side)[:, None]
    top = np.arange(n)[None, :] * stride
    return ((y >= top) & (y < top + patch)).astype(np.float32)


def patch_scores_to_map(scores: np.ndarray, patch: int, stride: int, side: int) -> np.ndarray:
    """Eq. 7 for ``B×h×w`` patch scores: ``A S Aᵀ / (A 1 Aᵀ)`` with A the cover matrix."""
    a_h = _cover_matrix(side, patch, stride)
    a_w = a_h if scores.shape[1] == scores.shape[2] else _cover_matrix(side, patch, stride)
    total = a_h @ scores @ a_w.T
    count = np.outer(a_h.sum(1), a_w.sum(1))
    return total / count


def _blur_matrix(side: int, sigma: float) -> np.ndarray:
    """``side×side`` matrix of the 1-D Gaussian blur with reflect padding (radius
    ``ceil(4σ)`` cut to ``side - 1`` and renormalised, as :func:`mspray.maps.gaussian_smooth`)."""
    r = min(math.ceil(4 * sigma), side - 1)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    src = np.arange(side)[:, None] + np.arange(-r, r + 1)[None, :]
    # reflect without repeating the edge pixel: -1 -> 1, side -> side - 2
    src = np.abs(src)
    src = np.where(src > side - 1, 2 * (side - 1) - src, src)
    g = np.zeros((side, side), np.float64)
    np.add.at(g, (np.repeat(np.arange(side), 2 * r + 1), src.ravel()), np.tile(k, side))
    return g.astype(np.float32)


def gaussian_smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``B×H×W`` maps, as two matrix products."""
    if sigma == 0:
        return maps
    g_h = _blur_matrix(maps.shape[1], sigma)
    g_w = g_h if maps.shape[1] == maps.shape[2] else _blur_matrix(maps.shape[2], sigma)
    return g_h @ maps @ g_w.T


def image_scores(maps: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Eq. 9: max over ``window×window`` windows at ``stride`` of the window mean (``B``)."""
    kh, kw = min(window, maps.shape[1]), min(window, maps.shape[2])
    c = np.zeros((maps.shape[0], maps.shape[1] + 1, maps.shape[2] + 1), np.float64)
    c[:, 1:, 1:] = maps.astype(np.float64).cumsum(1).cumsum(2)
    ys = np.arange(0, maps.shape[1] - kh + 1, stride)
    xs = np.arange(0, maps.shape[2] - kw + 1, stride)
    y0, x0 = ys[:, None], xs[None, :]
    sums = c[:, y0 + kh, x0 + kw] - c[:, y0, x0 + kw] - c[:, y0 + kh, x0] + c[:, y0, x0]
    return (sums / (kh * kw)).reshape(maps.shape[0], -1).max(1).astype(np.float32)


class ExportedScorer:
    """Scores images with the files written by :func:`mspray.onnx.export.export_bundle`."""

    def __init__(self, export_dir: str, threads: int | None = None):
        import faiss
        import onnxruntime as ort

        root = Path(export_dir)
        spec_path = root / SPEC_FILE
        if not spec_path.is_file():
            raise FileNotFoundError(f"{export_dir}: no {SPEC_FILE} (not an mspray export)")
        self.spec = json.loads(spec_path.read_text())
        threads = threads or len(os.sched_getaffinity(0))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        faiss.omp_set_num_threads(threads)
        self.scales = [int(s) for s in self.spec["scales"]]
        self.strides = dict(zip(self.scales, self.spec["strides"], strict=True))
        self.net_strides = dict(zip(self.scales, self.spec["network_strides"], strict=True))
        self.sessions = {
            s: ort.InferenceSession(
                str(root / self.spec["encoders"][str(s)]), so, providers=["CPUExecutionProvider"]
            )
            for s in self.scales
        }
        self.banks = {
            s: faiss.read_index(str(root / self.spec["banks"][str(s)])) for s in self.scales
        }
        self.mean = np.asarray(self.spec["image_mean"], np.float32)[None, :, None, None]
        self.std = np.asarray(self.spec["image_std"], np.float32)[None, :, None, None]

    @property
    def threshold(self) -> float | None:
        return self.spec.get("threshold")

    def predict(
        self, images: np.ndarray, timings: dict[str, float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``B×3×H×W`` float32 in [0, 1] (H = W = image_size) -> (image scores ``B``,
        fused smoothed maps ``B×H×W``). ``timings`` collects seconds per stage."""

        def tick(stage: str, t0: float) -> float:
            t1 = time.perf_counter()
            if timings is not None:
                timings[stage] = timings.get(stage, 0.0) + t1 - t0
            return t1

        images = np.asarray(images, np.float32)
        size = self.spec["image_size"]
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"images must be B×3×{size}×{size}, got {images.shape}")
        x = (images - self.mean) / self.std
        stats = self.spec.get("fusion_stats") if self.spec["fusion"] == "zscore" else None
        fused = None
        for s in sorted(self.scales):  # fixed order, as mspray.maps.fuse_maps
            t = time.perf_counter()
            grid = self.sessions[s].run(None, {"images": x})[0]
            step = self.strides[s] // self.net_strides[s]
            grid = np.ascontiguousarray(grid[:, :, ::step, ::step].transpose(0, 2, 3, 1))
            t = tick(f"encoder_{s}", t)
            b, h, w, d = grid.shape
            sq, _ = self.banks[s].search(grid.reshape(-1, d), 1)
            dist = np.sqrt(np.maximum(sq[:, 0], 0.0)).reshape(b, h, w)
            t = tick(f"search_{s}", t)
            m = patch_scores_to_map(dist, s, self.strides[s], size)
            if stats is not None:
                mean, std = stats[str(s)]
                m = (m - mean) / max(float(std), 1e-12)
            fused = m if fused is None else fused + m
            tick("maps", t)
        t = time.perf_counter()
        fused = gaussian_smooth(fused.astype(np.float32), self.spec["smoothing_sigma"])
        scores = image_scores(fused, self.spec["score_window"], self.spec["score_window_stride"])
        tick("maps", t)
        return scores, fused


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="score images with an mspray ONNX export")
    ap.add_argument("export_dir")
    ap.add_argument("images", nargs="+")
    args = ap.parse_args(argv)
    scorer = ExportedScorer(args.export_dir)
    size = scorer.spec["image_size"]
    for path in args.images:
        score, _ = scorer.predict(load_rgb(path, size)[None])
        thr = scorer.threshold
        flag = None if thr is None else bool(score[0] > thr)
        print(json.dumps({"path": path, "score": float(score[0]), "is_anomalous": flag}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
