"""Synthetic anomalies pasted into normal images, with exact masks (for model selection).

The augmentation family of self-supervised anomaly detection with synthetic anomalies
(CutPaste and its successors): ``cutpaste`` (a rectangle of the same image moved elsewhere,
flipped and with its brightness/contrast jittered), ``scar`` (a thin line of random colour),
``noise`` (an elliptic blob of Gaussian noise) and ``colour`` (an elliptic region with its
colour shifted). They are *not* the defects of any test set; they only have to correlate
with "looks unlike the normal images", so that epochs can be ranked without test labels.

Everything is torch on CPU and deterministic in the generator passed in.
"""

from __future__ import annotations

import math

import torch

KINDS = ("cutpaste", "scar", "noise", "colour")


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _ellipse(h: int, w: int, g: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    """A random rotated ellipse mask ``H×W`` with semi-axes in ``[lo, hi]·min(H, W)``."""
    s = min(h, w)
    a, b = _u(g, lo, hi) * s, _u(g, lo, hi) * s
    cy, cx = _u(g, 0.15, 0.85) * h, _u(g, 0.15, 0.85) * w
    t = _u(g, 0, math.pi)
    yy = torch.arange(h, dtype=torch.float32)[:, None] + 0.5 - cy
    xx = torch.arange(w, dtype=torch.float32)[None, :] + 0.5 - cx
    along = xx * math.cos(t) + yy * math.sin(t)
    across = yy * math.cos(t) - xx * math.sin(t)
    return (along / a) ** 2 + (across / b) ** 2 < 1.0


def _cutpaste(img: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    _, h, w = img.shape
    ph = max(2, int(_u(g, 0.08, 0.22) * h))
    pw = max(2, int(_u(g, 0.08, 0.22) * w))
    sy, sx = int(_u(g, 0, h - ph)), int(_u(g, 0, w - pw))
    # The target must not overlap the source, or the "anomaly" is partly the patch itself.
    for _ in range(20):
        ty, tx = int(_u(g, 0, h - ph)), int(_u(g, 0, w - pw))
        if abs(ty - sy) >= ph or abs(tx - sx) >= pw:
            break
    patch = img[:, sy : sy + ph, sx : sx + pw]
    if float(torch.rand((), generator=g)) < 0.5:
        patch = patch.flip(-1)
    if float(torch.rand((), generator=g)) < 0.5:
        patch = patch.flip(-2)
    mean = patch.mean((1, 2), keepdim=True)
    patch = (patch - mean) * _u(g, 0.6, 1.4) + mean + _u(g, -0.15, 0.15)
    out = img.clone()
    out[:, ty : ty + ph, tx : tx + pw] = patch.clamp(0, 1)
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[ty : ty + ph, tx : tx + pw] = True
    return out, mask


def _scar(img: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    _, h, w = img.shape
    s = min(h, w)
    cy, cx = _u(g, 0.2, 0.8) * h, _u(g, 0.2, 0.8) * w
    half, t = _u(g, 0.08, 0.2) * s, _u(g, 0, math.pi)
    width = max(1.5, _u(g, 0.012, 0.03) * s)
    yy = torch.arange(h, dtype=torch.float32)[:, None] + 0.5 - cy
    xx = torch.arange(w, dtype=torch.float32)[None, :] + 0.5 - cx
    along = (xx * math.cos(t) + yy * math.sin(t)).abs()
    across = (yy * math.cos(t) - xx * math.sin(t)).abs()
    mask = (along < half) & (across < width / 2)
    colour = torch.rand(3, 1, 1, generator=g)
    return torch.where(mask, colour, img), mask


def _noise(img: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    _, h, w = img.shape
    mask = _ellipse(h, w, g, 0.05, 0.12)
    noise = torch.randn(img.shape, generator=g) * _u(g, 0.15, 0.3)
    return torch.where(mask, (img + noise).clamp(0, 1), img), mask


def _colour(img: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    _, h, w = img.shape
    mask = _ellipse(h, w, g, 0.06, 0.14)
    sign = torch.where(torch.rand(3, 1, 1, generator=g) < 0.5, -1.0, 1.0)
    shift = sign * (0.12 + 0.18 * torch.rand(3, 1, 1, generator=g))
    return torch.where(mask, (img + shift).clamp(0, 1), img), mask


_PASTE = {"cutpaste": _cutpaste, "scar": _scar, "noise": _noise, "colour": _colour}


def paste_anomaly(
    image: torch.Tensor, kind: str, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One anomaly of ``kind`` pasted into ``image`` (``3×H×W`` in [0, 1]); returns the new
    image and the ``H×W`` bool mask of the pixels it changed. Never empty."""
    if kind not in _PASTE:
        raise ValueError(f"unknown anomaly kind {kind!r}; choose from {KINDS}")
    for _ in range(10):
        out, mask = _PASTE[kind](image, g)
        if mask.any():
            return out, mask
    raise RuntimeError(f"could not draw a non-empty {kind} anomaly on a {tuple(image.shape)} image")


def paste_anomalies(
    images: torch.Tensor, copies: int, seed: int, kinds: tuple[str, ...] = KINDS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``copies`` anomalous versions of every image of ``images`` (``B×3×H×W`` in [0, 1]),
    the kinds cycling through ``kinds``; returns ``(B·copies)×3×H×W`` images and
    ``(B·copies)×H×W`` bool masks, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    outs, masks = [], []
    for c in range(copies):
        for b in range(images.shape[0]):
            out, mask = paste_anomaly(images[b].float(), kinds[(b + c) % len(kinds)], g)
            outs.append(out)
            masks.append(mask)
    if not outs:
        h, w = images.shape[-2:]
        return images.new_zeros((0, 3, h, w)).float(), torch.zeros((0, h, w), dtype=torch.bool)
    return torch.stack(outs), torch.stack(masks)
