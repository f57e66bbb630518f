"""Overlapping tiles of one large gravel-like photo, named in random order (an MVTec-layout
dataset): near-duplicates that name order does not reveal.

Training tiles are cut on a grid with a stride below the tile size from the left part of
the photo; test tiles (normal, and with a drawn defect and its mask) come from the right
part, which no training tile touches. Gravel is a stochastic texture (stones of random
shape and tone): a new tile has no near-copy anywhere, unlike the periodic fabric of
:mod:`mspray.data.synthetic`, so a threshold calibrated on tiles that found their
overlapping neighbours in the bank flags many new normal tiles.
"""

from __future__ import annotations

import random

import numpy as np

from mspray import storage
from mspray.data.synthetic import DEFECTS, _add_defect, write_png


def gravel(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An ``height×width×3`` float image in [0, 1]: Voronoi stones of random grey-brown
    tones, darker at their borders, with fine grain."""
    from scipy.ndimage import gaussian_filter
    from scipy.spatial import cKDTree

    n = max(2, height * width // 150)
    seeds = np.stack([rng.uniform(0, height, n), rng.uniform(0, width, n)], 1)
    tone = rng.uniform(0.3, 0.8, (n, 1)) * np.array([1.0, 0.93, 0.82])
    yy, xx = np.mgrid[0:height, 0:width]
    d, idx = cKDTree(seeds).query(np.stack([yy.ravel(), xx.ravel()], 1), k=2)
    border = np.clip((d[:, 1] - d[:, 0]) / 2.0, 0, 1).reshape(height, width)
    img = tone[idx[:, 0]].reshape(height, width, 3) * (0.4 + 0.6 * border[..., None])
    img += gaussian_filter(rng.standard_normal((height, width)), 1.0)[..., None] * 0.05
    return np.clip(img, 0, 1).astype(np.float32)


def _png(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def make_tile_dataset(
    root: str,
    category: str = "tiles",
    size: int = 64,
    grid: int = 4,
    stride: int | None = None,
    n_test_good: int = 30,
    n_test_defect: int = 15,
    seed: int = 0,
) -> str:
    """Write the dataset under ``root/category`` and return that path.

    Training tiles: every ``stride`` pixels (default ``size // 4``: a tile overlaps its
    neighbours by 3/4) over a ``grid·size`` square, renamed in a seeded random order. Test
    tiles: a non-overlapping walk over an equal square to its right (one tile's width
    apart), every third one with a texture defect (``test/<defect>``, masks in
    ``ground_truth``)."""
    stride = stride or size // 4
    rng = np.random.default_rng([seed, 20])
    side = grid * size
    photo = gravel(rng, side, 2 * side + size)
    cat = storage.join(root, category)
    starts = range(0, side - size + 1, stride)
    tiles = [photo[y : y + size, x : x + size] for y in starts for x in starts]
    names = list(range(len(tiles)))
    random.Random(seed).shuffle(names)
    for tile, name in zip(tiles, names, strict=True):
        write_png(storage.join(cat, "train", "good", f"{name:04d}.png"), _png(tile))
    x0 = side + size
    free = [(y, x) for y in range(0, side - size + 1, size // 2)
            for x in range(x0, x0 + side - size + 1, size // 2)]  # fmt: skip
    n_test = n_test_good + n_test_defect
    if n_test > len(free):
        raise ValueError(f"{n_test} test tiles asked, the test square holds {len(free)}")
    region = np.ones((size, size), bool)
    for k, (y, x) in enumerate(free[:n_test]):
        tile = photo[y : y + size, x : x + size].copy()
        if k < n_test_defect:
            defect = DEFECTS["texture"][k % 3]
            img, mask = _add_defect(tile, region, defect, np.random.default_rng([seed, 21, k]))
            write_png(storage.join(cat, "test", defect, f"{k:04d}.png"), _png(img))
            write_png(
                storage.join(cat, "ground_truth", defect, f"{k:04d}_mask.png"),
                mask.astype(np.uint8) * 255,
            )
        else:
            write_png(storage.join(cat, "test", "good", f"{k:04d}.png"), _png(tile))
    return cat
