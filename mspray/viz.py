"""Heatmap overlays a person can look at (PNG), without a plotting library."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Anchor colours of a perceptually ordered "inferno"-like ramp (dark -> yellow).
_RAMP = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


def colorize(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """``H×W`` float map -> ``H×W×3`` uint8 colours, ``vmin``..``vmax`` over the ramp."""
    t = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
    frac = (t - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    vmin: float,
    vmax: float,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Side-by-side panel: image | heatmap blended on the image (| ground truth mask)."""
    heat = colorize(amap, vmin, vmax)
    blend = (image.astype(np.float32) * (1 - alpha) + heat * alpha).astype(np.uint8)
    panels = [image, blend]
    if mask is not None:
        panels.append(np.repeat((mask > 0).astype(np.uint8)[..., None] * 255, 3, axis=2))
    return np.concatenate(panels, axis=1)


def color_range(amaps, threshold: float | None) -> tuple[float, float]:
    """Colour range for a batch of maps: the calibrated threshold sits mid-ramp, so the same
    colour means the same score in every panel of a run."""
    lo = float(amaps.min())
    if threshold is None or threshold <= lo:
        return lo, max(float(amaps.max()), lo + 1e-6)
    return lo, 2 * threshold - lo


def to_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def tensor_to_rgb(image) -> np.ndarray:
    """``3×H×W`` float tensor in [0, 1] -> ``H×W×3`` uint8."""
    return (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
