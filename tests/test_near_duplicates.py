"""Near-duplicates by content and the folds that keep them out of each other's banks."""

import numpy as np
import pytest
import torch

from mspray.decisions.near_duplicates import (
    content_fold_plan,
    near_duplicate_pairs,
    needs_content_folds,
    share_matrix,
)


def _field(side: int, dim: int, g: torch.Generator) -> torch.Tensor:
    """A ``side×side×dim`` random field smoothed over 3×3 cells: neighbouring patch
    embeddings are alike, as those of real patches a stride apart are."""
    x = torch.randn(dim, side + 2, side + 2, generator=g)
    return torch.nn.functional.avg_pool2d(x[None], 3, 1)[0].permute(1, 2, 0)


def _dups(emb):
    # the grid cells stand for 8-px patches at a 4-px stride
    return near_duplicate_pairs(share_matrix(emb, patch=8, stride=4))


def _tiles(n_side: int = 8, tile: int = 4, stride: int = 2, dim: int = 16):
    """Patch embeddings of overlapping tiles of one random 'photo' (a grid of vectors),
    shuffled; and which tiles share at least half of their patches."""
    g = torch.Generator().manual_seed(0)
    side = (n_side - 1) * stride + tile
    photo = _field(side, dim, g)
    corners = [(y, x) for y in range(0, side - tile + 1, stride)
               for x in range(0, side - tile + 1, stride)]  # fmt: skip
    perm = torch.randperm(len(corners), generator=g).tolist()
    corners = [corners[i] for i in perm]
    emb = torch.stack([photo[y : y + tile, x : x + tile].reshape(-1, dim) for y, x in corners])
    c = np.array(corners)
    overlap = np.clip(tile - np.abs(c[:, None, :] - c[None, :, :]), 0, None).prod(-1)
    return emb, overlap


def test_tiles_sharing_patches_are_near_duplicates_and_disjoint_ones_are_not():
    emb, overlap = _tiles()
    dup = _dups(emb)
    off = ~np.eye(len(dup), dtype=bool)
    assert (dup == dup.T).all() and not dup[~off].any()
    assert dup[(overlap >= 8) & off].all()  # half a tile or more in common
    assert not dup[overlap == 0].any()
    assert needs_content_folds(dup, gap=0)


def test_independent_images_have_no_near_duplicates():
    g = torch.Generator().manual_seed(1)
    emb = torch.stack([_field(4, 16, g).reshape(16, 16) for _ in range(40)])
    dup = _dups(emb)
    assert not dup.any() and not needs_content_folds(dup, gap=0)


def test_content_folds_score_every_image_once_and_keep_its_near_duplicates_out():
    emb, _ = _tiles()
    dup = _dups(emb)
    plan = content_fold_plan(dup, folds=5, gap=1)
    scored = np.concatenate([s for s, _ in plan])
    assert sorted(scored.tolist()) == list(range(len(dup)))
    for s, excluded in plan:
        assert set(s) <= set(excluded)
        assert set(np.flatnonzero(dup[s].any(0))) <= set(excluded)
        assert {int(i) + 1 for i in s if i + 1 < len(dup)} <= set(excluded)  # name gap
        assert len(excluded) < len(dup)  # something left for the bank


@pytest.mark.parametrize(("n_side", "tile"), [(5, 6), (9, 8)])
def test_heavily_overlapping_tiles_are_found_against_an_absolute_reference(n_side, tile):
    # 25 and 81 tiles at stride 2: most pairs overlap, so the median pair is an overlapping
    # one and a test relative to it misses many; every pair sharing a quarter of the tile or
    # more must be found, and none sharing nothing
    emb, overlap = _tiles(n_side=n_side, tile=tile, stride=2)
    # patches cut at another offset are near-copies, not copies
    emb = emb + 0.05 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(3))
    dup = _dups(emb)
    off = ~np.eye(len(dup), dtype=bool)
    assert (overlap[off] > 0).mean() > 0.35
    assert dup[(overlap >= tile * tile / 4) & off].all()
    assert not dup[overlap == 0].any()
