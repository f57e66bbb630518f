"""Near-duplicates among normal images found by content, and cross-calibration folds that
keep them apart.

The name-order gap (:func:`mspray.calibration.near_duplicate_gap`) finds near-duplicates
only when they sit next to each other in name order (frames of a camera). Tiles cut with
overlap from a few large photos, named in any order, defeat it: a held-out tile then finds
its overlapping neighbours in its fold's bank, scores like a bank image, and the threshold
sits far too low (measured on overlapping gravel tiles in random name order: 36 % of new
normal tiles flagged against a 0.9 % promise).

Here every pair of images is compared (:func:`closeness_matrix`): image j is a
near-duplicate of image i when it holds near-copies of a tenth of i's patches, i.e. its
closeness is far below that of a typical pair. Folds are then contiguous blocks of a
bandwidth-minimising order of that graph (reverse Cuthill-McKee, so near-duplicates land in
the same or a neighbouring block), and a fold's bank leaves out the fold, every
near-duplicate of an image in it, and the name-order gap around it.
"""

from __future__ import annotations

import numpy as np
import torch

#: Pairs are compared on this many patches of the first image (a random subset, seeded).
QUERY_PATCHES = 32
#: The share of an image's patches that must have near-copies in the other image.
QUANTILE = 0.1
#: A pair is a near-duplicate when its closeness is below this share of the median pair's.
RATIO = 0.5
#: Floats per distance block of :func:`closeness_matrix` (bounds its memory, ~64 MB).
_BLOCK = 1 << 24


def closeness_matrix(emb: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``S×S``: entry (i, j) is the :data:`QUANTILE` quantile, over (a subset of) image i's
    patches, of the distance to the nearest patch of image j; ``emb`` is ``S×P×D`` (patch
    embeddings of the coarsest scale at the bank stride). The diagonal is +inf."""
    s, p, d = emb.shape
    g = torch.Generator().manual_seed(seed)
    q = emb[:, torch.randperm(p, generator=g)[: min(p, QUERY_PATCHES)]].float()  # S×Q×D
    flat = emb.reshape(s * p, d).float()
    sq = flat.square().sum(1)
    rows = max(1, _BLOCK // (q.shape[1] * s * p))
    out = torch.empty(s, s)
    for i in range(0, s, rows):
        part = q[i : i + rows].reshape(-1, d)
        # |q - b|² = |q|² + |b|² - 2 q·b: one product; |q|² and the root after the min
        near = torch.addmm(sq, part, flat.T, alpha=-2).view(-1, s, p).amin(-1)
        dist = (near + part.square().sum(1, keepdim=True)).clamp_min(0).sqrt()
        out[i : i + rows] = torch.quantile(dist.view(-1, q.shape[1], s), QUANTILE, dim=1)
    out.fill_diagonal_(float("inf"))
    return out


def near_duplicate_pairs(closeness: torch.Tensor) -> np.ndarray:
    """Symmetric ``S×S`` bools: pairs whose closeness (either way) is below :data:`RATIO`
    times the median over all pairs."""
    c = closeness.numpy()
    off = c[~np.eye(len(c), dtype=bool)]
    if off.size == 0:
        return np.zeros(c.shape, bool)
    dup = c < RATIO * float(np.median(off))
    return dup | dup.T


def needs_content_folds(dup: np.ndarray, gap: int) -> bool:
    """Whether some near-duplicate pair is further apart in name order than ``gap`` (the
    name-order folds would then put one in the other's bank)."""
    i, j = np.nonzero(dup)
    return bool(np.any(np.abs(i - j) > gap))


def content_fold_plan(
    dup: np.ndarray, folds: int, gap: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(scored, excluded)`` per fold, as :func:`mspray.calibration.fold_plan`: folds are
    contiguous blocks of the reverse Cuthill-McKee order of the near-duplicate graph
    ``dup`` (``N×N``, images in name order); each excludes its images, their
    near-duplicates and ``gap`` images either side of each in name order."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    n = len(dup)
    order = reverse_cuthill_mckee(csr_matrix(dup), symmetric_mode=True)
    plan = []
    for block in np.array_split(order, min(folds, n)):
        out = np.zeros(n, bool)
        out[block] = True
        out |= dup[block].any(0)
        for k in range(1, gap + 1):  # the name-order gap as well
            out[np.clip(block - k, 0, n - 1)] = True
            out[np.clip(block + k, 0, n - 1)] = True
        plan.append((np.sort(block), np.flatnonzero(out)))
    return plan
