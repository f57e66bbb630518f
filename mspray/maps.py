"""Patch scores -> pixel anomaly maps, multi-scale fusion and image scores (paper sec. 3.4).

All functions are batch-first (``B×H×W`` maps) and vectorised: no per-patch Python loops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Floor on a scale's std in z-score fusion, so a constant normal map cannot divide by zero.
_STD_EPS = 1e-12


def _float(t: torch.Tensor) -> torch.Tensor:
    # Half precision and integer tensors lack CPU conv kernels; float64 is kept as is.
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _check_maps(maps: torch.Tensor, name: str = "maps") -> None:
    if maps.dim() != 3:
        raise ValueError(f"{name} must be B×H×W, got shape {tuple(maps.shape)}")


def patch_scores_to_map(
    scores: torch.Tensor, patch_size: int, stride: int, image_size: int | tuple[int, int]
) -> torch.Tensor:
    """Eq. 7: each pixel gets the mean score of all patches covering it.

    ``scores[b, i, j]`` is the score of the ``patch_size`` patch whose top-left corner is at
    ``(i*stride, j*stride)``. Returns ``B×H×W``. The patch grid must tile the image exactly
    (``(H - patch_size) % stride == 0`` and ``stride <= patch_size``, likewise for W), so
    every pixel is covered; otherwise ``ValueError`` (the config enforces this too).
    """
    _check_maps(scores, "scores")
    hh, ww = (image_size, image_size) if isinstance(image_size, int) else image_size
    if patch_size < 1 or stride < 1:
        raise ValueError(f"patch_size and stride must be >= 1, got {patch_size}, {stride}")
    if stride > patch_size:
        raise ValueError(f"stride {stride} > patch_size {patch_size} leaves pixels uncovered")
    for side, n in ((hh, scores.shape[1]), (ww, scores.shape[2])):
        if side < patch_size or (side - patch_size) % stride:
            raise ValueError(
                f"patches of {patch_size} at stride {stride} do not tile an image side of {side}"
            )
        expected = (side - patch_size) // stride + 1
        if n != expected:
            raise ValueError(
                f"score grid {tuple(scores.shape[1:])} does not match image {(hh, ww)} "
                f"(expected {expected} patches along a side of {side})"
            )
    s = _float(scores).unsqueeze(1)  # B×1×h×w
    kernel = torch.ones(1, 1, patch_size, patch_size, dtype=s.dtype, device=s.device)
    # Transposed conv with a ones kernel scatters each score onto its patch's pixels (sum);
    # the same on a ones grid counts the patches covering each pixel (same for all images).
    total = F.conv_transpose2d(s, kernel, stride=stride)
    count = F.conv_transpose2d(torch.ones_like(s[:1]), kernel, stride=stride)
    return (total / count).squeeze(1)


def _gaussian_kernel(sigma: float, radius: int, dtype: torch.dtype, device) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``B×H×W`` maps with reflect padding; ``sigma == 0`` returns
    the input unchanged.

    The kernel radius is ``ceil(4σ)``, cut to ``side - 1`` on maps too small for that
    (reflect padding needs pad < side) and renormalised, so small maps still blur.
    """
    if sigma < 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    if sigma == 0:
        return maps
    _check_maps(maps)
    x = _float(maps).unsqueeze(1)  # B×1×H×W
    radius = math.ceil(4 * sigma)
    for dim in (2, 3):
        r = min(radius, x.shape[dim] - 1)
        if r == 0:
            continue
        k = _gaussian_kernel(sigma, r, x.dtype, x.device)
        if dim == 2:
            x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
        else:
            x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return x.squeeze(1)


def fuse_maps(
    maps: dict[int, torch.Tensor], stats: dict[int, tuple[float, float]] | None = None
) -> torch.Tensor:
    """Eq. 8: sum of the per-scale maps (``{scale: B×H×W}``).

    With ``stats`` (``{scale: (mean, std)}`` of normal map values) each map is z-scored
    first, so scales with larger raw distances do not dominate the sum; std is floored at a
    tiny epsilon.
    """
    if not maps:
        raise ValueError("fuse_maps needs at least one scale")
    shapes = {tuple(m.shape) for m in maps.values()}
    if len(shapes) != 1:
        raise ValueError(f"per-scale maps differ in shape: {sorted(shapes)}")
    if stats is not None and (missing := sorted(set(maps) - set(stats))):
        raise ValueError(f"no normalisation stats for scale(s) {missing}")
    out = None
    for scale in sorted(maps):  # fixed order: float sums do not depend on dict order
        m = _float(maps[scale])
        if stats is not None:
            mean, std = stats[scale]
            m = (m - mean) / max(float(std), _STD_EPS)
        out = m.clone() if out is None else out + m
    return out


def image_scores(maps: torch.Tensor, window: int = 8, stride: int = 4) -> torch.Tensor:
    """Eq. 9: ``B×H×W -> B``, the max over ``window×window`` windows (at ``stride``) of the
    window mean.

    Windows start at multiples of ``stride`` and lie fully inside the map, so when
    ``(H - window) % stride != 0`` the last few rows are in no window (likewise columns); a
    window larger than the map is cut to the map.
    """
    _check_maps(maps)
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window}, {stride}")
    kernel = (min(window, maps.shape[1]), min(window, maps.shape[2]))
    pooled = F.avg_pool2d(_float(maps).unsqueeze(1), kernel, stride=stride)
    return pooled.flatten(1).amax(dim=1)
