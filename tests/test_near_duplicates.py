"""Near-duplicates by content and the folds that keep them out of each other's banks."""

import numpy as np
import torch

from mspray.near_duplicates import (
    closeness_matrix,
    content_fold_plan,
    near_duplicate_pairs,
    needs_content_folds,
)


def _tiles(n_side: int = 8, tile: int = 4, stride: int = 2, dim: int = 16):
    """Patch embeddings of overlapping tiles of one random 'photo' (a grid of vectors),
    shuffled; and which tiles share at least half of their patches."""
    g = torch.Generator().manual_seed(0)
    side = (n_side - 1) * stride + tile
    photo = torch.randn(side, side, dim, generator=g)
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
    dup = near_duplicate_pairs(closeness_matrix(emb))
    off = ~np.eye(len(dup), dtype=bool)
    assert (dup == dup.T).all() and not dup[~off].any()
    assert dup[(overlap >= 8) & off].all()  # half a tile or more in common
    assert not dup[overlap == 0].any()
    assert needs_content_folds(dup, gap=0)


def test_independent_images_have_no_near_duplicates():
    emb = torch.randn(40, 16, 16, generator=torch.Generator().manual_seed(1))
    dup = near_duplicate_pairs(closeness_matrix(emb))
    assert not dup.any() and not needs_content_folds(dup, gap=0)


def test_content_folds_score_every_image_once_and_keep_its_near_duplicates_out():
    emb, _ = _tiles()
    dup = near_duplicate_pairs(closeness_matrix(emb))
    plan = content_fold_plan(dup, folds=5, gap=1)
    scored = np.concatenate([s for s, _ in plan])
    assert sorted(scored.tolist()) == list(range(len(dup)))
    for s, excluded in plan:
        assert set(s) <= set(excluded)
        assert set(np.flatnonzero(dup[s].any(0))) <= set(excluded)
        assert {int(i) + 1 for i in s if i + 1 < len(dup)} <= set(excluded)  # name gap
        assert len(excluded) < len(dup)  # something left for the bank
