"""Tests for mspray.maps: eq. 7 pixel maps, smoothing, eq. 8 fusion, eq. 9 image scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from mspray import maps as M
from mspray.maps import fuse_maps, gaussian_smooth, image_scores, patch_scores_to_map


def _naive_map(scores: torch.Tensor, p: int, stride: int, hw: tuple[int, int]) -> torch.Tensor:
    """Eq. 7 by the definition: accumulate every patch onto its pixels, divide by counts."""
    b, h, w = scores.shape
    total = torch.zeros(b, *hw, dtype=torch.float64)
    count = torch.zeros(hw, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            r, c = i * stride, j * stride
            total[:, r : r + p, c : c + p] += scores[:, i, j, None, None].double()
            count[r : r + p, c : c + p] += 1
    return total / count


def test_patch_map_two_overlapping_patches() -> None:
    # Two 2×2 patches at stride 1 on a 2×3 image: column 1 is covered by both.
    scores = torch.tensor([[[1.0, 3.0]]])
    out = patch_scores_to_map(scores, patch_size=2, stride=1, image_size=(2, 3))
    assert torch.equal(out, torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]))


def test_patch_map_hand_computed_2d() -> None:
    # Four 2×2 patches on a 3×3 image: the centre is covered by all four, edges by two.
    scores = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    out = patch_scores_to_map(scores, 2, 1, 3)
    expected = torch.tensor([[[1.0, 1.5, 2.0], [2.0, 2.5, 3.0], [3.0, 3.5, 4.0]]])
    assert torch.allclose(out, expected)


@pytest.mark.parametrize(
    ("p", "stride", "hw"),
    [(8, 4, (24, 32)), (16, 4, (64, 64)), (64, 16, (128, 96)), (6, 6, (18, 12)), (5, 3, (11, 5))],
)
def test_patch_map_matches_naive_loop(p: int, stride: int, hw: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(p * 100 + stride)
    h, w = (hw[0] - p) // stride + 1, (hw[1] - p) // stride + 1
    scores = torch.rand(3, h, w, generator=g)
    out = patch_scores_to_map(scores, p, stride, hw)
    assert out.shape == (3, *hw)
    assert torch.allclose(out.double(), _naive_map(scores, p, stride, hw), atol=1e-6)


def test_patch_map_rejects_bad_grids() -> None:
    with pytest.raises(ValueError, match="does not match"):
        patch_scores_to_map(torch.rand(1, 4, 5), 8, 4, 24)  # 24 needs a 5×5 grid
    with pytest.raises(ValueError, match="tile"):
        patch_scores_to_map(torch.rand(1, 5, 5), 8, 4, 25)  # (25 - 8) % 4 != 0
    with pytest.raises(ValueError, match="uncovered"):
        patch_scores_to_map(torch.rand(1, 2, 2), 4, 8, 12)
    with pytest.raises(ValueError, match="B×H×W"):
        patch_scores_to_map(torch.rand(5, 5), 8, 4, 24)


def test_smooth_zero_sigma_is_identity() -> None:
    m = torch.rand(2, 8, 8)
    assert gaussian_smooth(m, 0.0) is m


def test_smooth_keeps_constant_map() -> None:
    m = torch.full((2, 20, 13), 3.5)
    assert torch.allclose(gaussian_smooth(m, 2.0), m, atol=1e-5)
    # Maps smaller than the kernel radius still work (radius cut to the map).
    small = torch.full((1, 5, 3), -1.0)
    assert torch.allclose(gaussian_smooth(small, 4.0), small, atol=1e-6)


def test_smooth_preserves_mass_and_spreads_impulse() -> None:
    m = torch.zeros(1, 64, 64)
    m[0, 32, 30] = 1.0
    out = gaussian_smooth(m, 2.0)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)  # far from the border: exact
    assert out[0].argmax().item() == 32 * 64 + 30
    assert out[0, 32, 30] < 0.1  # spread out
    assert torch.allclose(out[0], out[0].flip(0).roll(1, 0), atol=1e-7)  # symmetric about row 32
    # Over a whole map, reflect padding keeps the mass roughly (it is exact only in the
    # interior: mass right at the border is mirrored back, not lost).
    g = torch.Generator().manual_seed(0)
    noisy = torch.rand(4, 32, 32, generator=g)
    sums = gaussian_smooth(noisy, 1.5).sum(dim=(1, 2))
    assert torch.allclose(sums, noisy.sum(dim=(1, 2)), rtol=0.02)


def test_smooth_matches_scipy_mirror() -> None:
    # torch's "reflect" padding is scipy's "mirror" mode; both truncate at 4σ here.
    rng = np.random.default_rng(0)
    x = rng.random((2, 30, 25))
    out = gaussian_smooth(torch.from_numpy(x), 1.5).numpy()
    ref = ndimage.gaussian_filter(x, sigma=(0, 1.5, 1.5), mode="mirror", truncate=4.0)
    assert np.allclose(out, ref, atol=1e-10)


def test_fuse_sum_and_zscore() -> None:
    g = torch.Generator().manual_seed(1)
    maps = {64: torch.rand(2, 8, 8, generator=g) * 10, 16: torch.rand(2, 8, 8, generator=g)}
    assert torch.allclose(fuse_maps(maps), maps[64] + maps[16])
    stats = {64: (5.0, 2.0), 16: (0.5, 0.25)}
    expected = (maps[64] - 5.0) / 2.0 + (maps[16] - 0.5) / 0.25
    assert torch.allclose(fuse_maps(maps, stats), expected)
    # A zero std is floored, not a division by zero.
    flat = fuse_maps({16: torch.ones(1, 2, 2)}, {16: (1.0, 0.0)})
    assert torch.equal(flat, torch.zeros(1, 2, 2))
    # The inputs are not modified.
    assert torch.allclose(fuse_maps(maps), maps[64] + maps[16])


def test_fuse_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        fuse_maps({})
    with pytest.raises(ValueError, match="shape"):
        fuse_maps({1: torch.zeros(1, 4, 4), 2: torch.zeros(1, 4, 5)})
    with pytest.raises(ValueError, match="stats"):
        fuse_maps({1: torch.zeros(1, 4, 4), 2: torch.zeros(1, 4, 4)}, {1: (0.0, 1.0)})


@pytest.mark.parametrize(
    ("hw", "window", "stride"),
    [((20, 17), 8, 4), ((32, 32), 8, 4), ((9, 12), 3, 2), ((6, 6), 8, 4)],
)
def test_image_scores_match_brute_force(hw: tuple[int, int], window: int, stride: int) -> None:
    g = torch.Generator().manual_seed(hw[0])
    maps = torch.rand(3, *hw, generator=g)
    out = image_scores(maps, window, stride)
    wh, ww = min(window, hw[0]), min(window, hw[1])  # windows are cut to the map
    for b in range(3):
        best = max(
            maps[b, r : r + wh, c : c + ww].mean().item()
            for r in range(0, hw[0] - wh + 1, stride)
            for c in range(0, hw[1] - ww + 1, stride)
        )
        assert out[b].item() == pytest.approx(best, abs=1e-6)


def test_image_scores_finds_the_hot_window() -> None:
    maps = torch.zeros(2, 32, 32)
    maps[1, 8:16, 12:20] = 2.0  # one aligned 8×8 window
    maps[1, 0, 0] = 50.0  # a lone outlier pixel is averaged down (64 pixels per window)
    assert torch.allclose(image_scores(maps), torch.tensor([0.0, 2.0]))


@pytest.mark.parametrize(
    ("patch", "stride", "size", "sigma"),
    [(16, 4, (64, 64), 4.0), (32, 4, (64, 48), 4.0), (64, 16, (256, 256), 4.0), (16, 4, 32, 0.0)],
)
def test_smoothed_patch_map_is_spread_then_blur(patch, stride, size, sigma) -> None:
    hh, ww = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, (hh - patch) // stride + 1, (ww - patch) // stride + 1, generator=g)
    two_step = M.gaussian_smooth(M.patch_scores_to_map(scores, patch, stride, size), sigma)
    got = M.smoothed_patch_map(scores, patch, stride, size, sigma)
    assert got.shape == (3, hh, ww)
    torch.testing.assert_close(got, two_step, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        M.smoothed_patch_map(scores[:, 1:], patch, stride, size, sigma)
