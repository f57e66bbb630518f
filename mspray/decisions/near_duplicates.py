"""Near-duplicates among normal images found by content, and cross-calibration folds that
keep them apart.

The name-order gap (:func:`mspray.decisions.calibration.near_duplicate_gap`) finds near-duplicates
only when they sit next to each other in name order (frames of a camera). Tiles cut with
overlap from a few large photos, named in any order, defeat it: a held-out tile then finds
its overlapping neighbours in its fold's bank, scores like a bank image, and the threshold
sits far too low (measured on overlapping gravel tiles in random name order: 36 % of new
normal tiles flagged against a 0.9 % promise).

Here every pair of (sampled) images is compared (:func:`share_matrix`) by what overlap is:
image j overlaps image i when it holds near-copies of at least :data:`SHARE` of i's
patches, at any offset. A near-copy is judged against an absolute reference taken from i
itself, not against other pairs: a patch of j is a near-copy of i's patch q when it is
:data:`NEAR` times closer to q than any patch of i shifted from q by half a patch or more (new
content of the same texture comes no closer than that; a shared patch, cut at another
offset, is at most half a bank stride off). Folds are then contiguous blocks of a
bandwidth-minimising order of that graph (reverse Cuthill-McKee, so near-duplicates land in
the same or a neighbouring block), and a fold's bank leaves out the fold, every
near-duplicate of an image in it, and the name-order gap around it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Pairs are compared on this many patches of the first image (a random subset, seeded).
QUERY_PATCHES = 64
#: The share of an image's patches with near-copies in another that makes them overlap.
SHARE = 0.1
#: ... unless the pairs in general share that much (a periodic texture, where every patch
#: has near-copies everywhere): a pair must then share this many times the 10 % quantile.
OVER_TYPICAL = 2.0
#: A near-copy is closer than this share of the reference distance (the nearest own patch
#: half a patch or more away); a shared patch cut at another offset is off by at most half
#: a bank stride, far less than half a patch.
NEAR = 0.5
#: Floats per distance block of :func:`share_matrix` (bounds its memory, ~64 MB).
_BLOCK = 1 << 24


def share_matrix(emb: torch.Tensor, patch: int, stride: int, seed: int = 0) -> torch.Tensor:
    """``S×S``: entry (i, j) is the share of (a subset of) image i's patches that have a
    near-copy in image j (see the module docstring); ``emb`` is ``S×P×D``, the patch
    embeddings of ``patch``-px patches on square grids at ``stride`` px. Diagonal: 0."""
    s, p, d = emb.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"share_matrix: {p} patches per image are not a square grid")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(p, generator=g)[: min(p, QUERY_PATCHES)]
    emb = emb.float()
    q = emb[:, pick]  # S×Q×D
    # reference: the nearest own patch shifted by half a patch or more (Chebyshev, grid)
    yx = torch.stack([torch.arange(p) // side, torch.arange(p) % side], 1)
    far = (yx[pick][:, None] - yx[None]).abs().amax(-1) * stride >= max(1, patch // 2)
    own = torch.cdist(q, emb).masked_fill(~far, math.inf)  # S×Q×P
    # S×Q; where no own patch is that far (a patch as large as the image) there is no
    # reference, and no hit: 0 < 0 is false
    ref = own.amin(-1).nan_to_num(posinf=0.0)
    flat = emb.reshape(s * p, d)
    sq = flat.square().sum(1)
    rows = max(1, _BLOCK // (q.shape[1] * s * p))
    out = torch.empty(s, s)
    for i in range(0, s, rows):
        part = q[i : i + rows].reshape(-1, d)
        # |q - b|² = |q|² + |b|² - 2 q·b: one product; |q|² after the min
        near = torch.addmm(sq, part, flat.T, alpha=-2).view(-1, s, p).amin(-1)
        near = near + part.square().sum(1, keepdim=True)  # squared distances, (B·Q)×S
        hit = near.view(-1, q.shape[1], s) < (NEAR * ref[i : i + rows, :, None]).square()
        out[i : i + rows] = hit.float().mean(1)
    out.fill_diagonal_(0.0)
    return out


def near_duplicate_pairs(share: torch.Tensor) -> np.ndarray:
    """Symmetric ``S×S`` bools: pairs where either image holds near-copies of at least
    :data:`SHARE` of the other's patches (and :data:`OVER_TYPICAL` times what the 10 %
    quantile of all pairs shares)."""
    c = share.numpy()
    off = c[~np.eye(len(c), dtype=bool)]
    if off.size == 0:
        return np.zeros(c.shape, bool)
    dup = c >= max(SHARE, OVER_TYPICAL * float(np.quantile(off, 0.1)))
    np.fill_diagonal(dup, False)
    return dup | dup.T


def needs_content_folds(dup: np.ndarray, gap: int) -> bool:
    """Whether some near-duplicate pair is further apart in name order than ``gap`` (the
    name-order folds would then put one in the other's bank)."""
    i, j = np.nonzero(dup)
    return bool(np.any(np.abs(i - j) > gap))


def content_fold_plan(
    dup: np.ndarray, folds: int, gap: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(scored, excluded)`` per fold, as :func:`mspray.decisions.calibration.fold_plan`: folds are
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


#: The near-duplicate gap is measured on all images of a set up to this size, and on this
#: many (in :data:`GAP_RUNS` evenly spaced runs of consecutive names) of a larger one, so
#: its cost and memory stay bounded however many normal images there are. Near-duplicates
#: by content (:mod:`mspray.decisions.near_duplicates`) are looked for when all images are sampled.
GAP_SAMPLE = 512
GAP_RUNS = 4


def gap_sample(n_images: int) -> np.ndarray:
    """Positions (in sorted-name order) of the images :func:`near_duplicate_gap` looks at:
    all of them, or :data:`GAP_RUNS` runs of consecutive images, the runs evenly spaced so
    that each has a partner run half the set further on."""
    if n_images <= GAP_SAMPLE:
        return np.arange(n_images)
    starts = np.arange(GAP_RUNS) * (n_images // GAP_RUNS)
    return (starts[:, None] + np.arange(GAP_SAMPLE // GAP_RUNS)[None, :]).ravel()


def near_duplicate_gap(
    emb: torch.Tensor,
    positions: np.ndarray,
    n_images: int,
    max_gap: int = 32,
    ratio: float = 0.9,
    batch_size: int = 8,
) -> int:
    """How many images apart (in name order) images are still near-duplicates.

    ``emb`` (``S×P×D``) holds the patch embeddings (coarsest scale, bank stride) of the
    images at ``positions`` (:func:`gap_sample`) of a set of ``n_images``. For each distance
    d, how close image i+d comes to image i: the 10 % quantile over i's patches of the
    distance to the nearest patch of i+d (low when i+d holds copies of a tenth of i's
    patches), median over the sampled pairs. d counts as near-duplicate while that is below
    ``ratio`` times the same figure for images half the set apart. 0 for independent images
    (e.g. MVTec); consecutive overlapping frames give about the number of frames that share
    whole patches with one frame.
    """
    positions = np.asarray(positions, np.int64)
    max_gap = min(max_gap, len(positions) // 4)
    if max_gap < 1:
        return 0
    row = np.full(n_images, -1, np.int64)
    row[positions] = np.arange(len(positions))

    def closeness(offset: int, wrap: bool) -> float:
        j = positions + offset
        j = j % n_images if wrap else j
        ok = j < n_images
        ok[ok] = row[j[ok]] >= 0  # pairs whose both images were sampled
        a, b = row[positions[ok]], row[j[ok]]
        d = [
            torch.quantile(
                torch.cdist(emb[a[k : k + batch_size]], emb[b[k : k + batch_size]]).amin(-1),
                0.1,
                -1,
            )
            for k in range(0, len(a), batch_size)
        ]
        return float(torch.cat(d).median())

    sampled = len(positions) < n_images
    half = (GAP_RUNS // 2) * (n_images // GAP_RUNS) if sampled else n_images // 2
    far = closeness(half, wrap=True)
    gap = 0
    for d in range(1, max_gap + 1):
        if closeness(d, wrap=False) >= ratio * far:
            break
        gap = d
    return gap
