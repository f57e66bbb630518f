"""Patch scores -> pixel anomaly maps, multi-scale fusion and image scores (paper sec. 3.4).

All functions are batch-first (``B×H×W`` maps) and vectorised: no per-patch Python loops.
"""

from __future__ import annotations

import functools
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
    hh, ww = _check_grid(scores, patch_size, stride, image_size)
    s = _float(scores)
    # The patch-to-pixel spreading is separable: total = A_h · S · A_wᵀ with A[y, i] = 1 when
    # patch row i covers pixel row y; two small matrix products per image (far cheaper than
    # a transposed convolution with a patch-sized kernel), and the count is A_h·1 ⊗ A_w·1.
    a_h = _cover_matrix(hh, patch_size, stride, s.dtype, s.device)
    a_w = _cover_matrix(ww, patch_size, stride, s.dtype, s.device)
    total = a_h @ s @ a_w.T
    count = a_h.sum(1)[:, None] * a_w.sum(1)[None, :]
    return total / count


def smoothed_patch_map(
    scores: torch.Tensor,
    patch_size: int,
    stride: int,
    image_size: int | tuple[int, int],
    sigma: float,
) -> torch.Tensor:
    """``gaussian_smooth(patch_scores_to_map(scores, ...), sigma)`` in two small products.

    Spreading (eq. 7, divided by the separable cover count) and the blur are both linear
    and separable, so their composition is ``P_h · S · P_wᵀ`` with ``P = G · diag(1/c) · A``
    (``side × patches``): a few times cheaper than blurring the pixel map. Equal to the
    two-step result up to float rounding.
    """
    if sigma < 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    hh, ww = _check_grid(scores, patch_size, stride, image_size)
    s = _float(scores)
    p_h = _spread_blur(hh, patch_size, stride, float(sigma)).to(s.dtype).to(s.device)
    p_w = _spread_blur(ww, patch_size, stride, float(sigma)).to(s.dtype).to(s.device)
    return p_h @ s @ p_w.T


@functools.lru_cache(maxsize=64)
def _spread_blur(side: int, patch: int, stride: int, sigma: float) -> torch.Tensor:
    """``G · diag(1/c) · A`` of one side in float64 on CPU (cached: a few per config)."""
    a = _cover_matrix(side, patch, stride, torch.float64, "cpu")
    spread = a / a.sum(1, keepdim=True)
    if sigma == 0:
        return spread
    return _blur_matrix(side, sigma, torch.float64, "cpu") @ spread


def _check_grid(
    scores: torch.Tensor, patch_size: int, stride: int, image_size: int | tuple[int, int]
) -> tuple[int, int]:
    """The image's (H, W); ``ValueError`` unless ``scores`` is the patch grid tiling it."""
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
    return hh, ww


def _cover_matrix(side: int, patch: int, stride: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``side×n`` 0/1 matrix: pixel ``y`` lies in patch ``i`` (rows ``i*stride`` onwards)."""
    n = (side - patch) // stride + 1
    y = torch.arange(side, device=device)[:, None]
    top = torch.arange(n, device=device)[None, :] * stride
    return ((y >= top) & (y < top + patch)).to(dtype)


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
    x = _float(maps)
    # Each 1-D pass (reflect padding included) is a fixed side×side matrix, so the blur is
    # G_h · X · G_wᵀ: two dense matrix products instead of single-channel convolutions,
    # which CPU convolution kernels run poorly.
    g_h = _blur_matrix(x.shape[1], sigma, x.dtype, x.device)
    g_w = _blur_matrix(x.shape[2], sigma, x.dtype, x.device)
    return g_h @ x @ g_w.T


def _blur_matrix(side: int, sigma: float, dtype: torch.dtype, device) -> torch.Tensor:
    """``side×side`` matrix of the 1-D Gaussian blur with reflect padding; radius
    ``ceil(4σ)`` cut to ``side - 1`` (reflect padding needs pad < side), renormalised."""
    return _blur_matrix64(side, float(sigma)).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _blur_matrix64(side: int, sigma: float) -> torch.Tensor:
    """:func:`_blur_matrix` in float64 on CPU (cached: built with a scatter per call)."""
    r = min(math.ceil(4 * sigma), side - 1)
    if r == 0:
        return torch.eye(side, dtype=torch.float64)
    k = _gaussian_kernel(sigma, r, torch.float64, "cpu")
    src = torch.arange(side)[:, None] + torch.arange(-r, r + 1)[None, :]
    src = src.abs()  # reflect without repeating the edge: -1 -> 1, side -> side - 2
    src = torch.where(src > side - 1, 2 * (side - 1) - src, src)
    g = torch.zeros(side, side, dtype=torch.float64)
    g.index_put_(
        (torch.arange(side).repeat_interleave(2 * r + 1), src.flatten()),
        k.repeat(side),
        accumulate=True,
    )
    return g


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


def window_means(maps: torch.Tensor, window: int = 8, stride: int = 4) -> torch.Tensor:
    """``B×H×W -> B×h×w``: the mean of every ``window×window`` window (at ``stride``) that
    lies fully inside the map; a window larger than the map is cut to the map.

    Linear in the map, so window means of a weighted sum of maps are the same weighted sum
    of their window means (cross-calibration relies on it, see :mod:`mspray.decisions.calibration`).
    """
    _check_maps(maps)
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window}, {stride}")
    kernel = (min(window, maps.shape[1]), min(window, maps.shape[2]))
    return F.avg_pool2d(_float(maps).unsqueeze(1), kernel, stride=stride)[:, 0]


def image_scores(maps: torch.Tensor, window: int = 8, stride: int = 4) -> torch.Tensor:
    """Eq. 9: ``B×H×W -> B``, the max over ``window×window`` windows (at ``stride``) of the
    window mean (:func:`window_means`).

    Windows start at multiples of ``stride`` and lie fully inside the map, so when
    ``(H - window) % stride != 0`` the last few rows are in no window (likewise columns).
    """
    return window_means(maps, window, stride).flatten(1).amax(dim=1)
