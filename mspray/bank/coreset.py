"""Greedy k-center (farthest point) coreset, as in PatchCore, for the per-scale banks.

:func:`greedy_coreset` picks the rows a bank keeps: each pick is the point farthest from
everything picked so far. The plain loop is one matrix-vector product per pick; on CPU the
default cell-pruned loop (:func:`_greedy_cells`) measures only the rows a new pick can
bring closer, with the same picks up to float ties.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch

from mspray.bank.search import sync_faiss_threads


def greedy_coreset(
    embeddings: torch.Tensor,
    n_select: int,
    seed: int = 0,
    proj_dim: int | None = None,
    chunk: int = 65536,
    init_dist: torch.Tensor | None = None,
    prune: bool = True,
    cover: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Greedy k-center (farthest point) selection, as in PatchCore.

    Starts from a random point (or, with ``init_dist``, from the point farthest from an
    existing set), then repeatedly adds the point farthest from everything selected so far,
    keeping a running min-distance vector. Distances are taken on the centred (float32)
    data, so points far from the origin keep their precision. The plain loop updates it with one N×D
    matrix-vector product per pick (memory-bound); on CPU the default skips, per cell of
    nearby points, the updates the triangle inequality proves useless (:func:`_greedy_cells`).

    Args:
        embeddings: N×D tensor.
        n_select: number of points to pick (clipped to N).
        seed: seeds the start point and the projection; the result is deterministic.
        proj_dim: if set and < D, distances are computed after a Gaussian random projection
            to this many dimensions (Johnson–Lindenstrauss), which is much cheaper for big D.
        chunk: rows per block for the projection and norm passes (bounds temporaries).
        init_dist: optional N squared distances to an already-selected set (in the same,
            possibly projected, space), used to extend an existing bank incrementally.
        prune: cell pruning (CPU only; same picks as the plain loop up to float ties, several
            times faster on data of low intrinsic dimension such as patch embeddings, about
            as fast on data with no structure). ``False``, a GPU input, or a problem small
            enough for the plain loop to run in cache (N·D < 2²⁰, or under 128 picks) runs
            the plain loop, one full matrix-vector product per pick.
        cover: if given, gets ``nearest`` (per point, the number of its nearest pick in
            selection order; -1 where the ``init_dist`` set is nearer) and ``sq_dist`` (its
            squared distance to it), as the greedy loop leaves them.

    Returns:
        LongTensor of ``n_select`` distinct indices, in selection order, on the input's device.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings: expected N×D, got shape {tuple(embeddings.shape)}")
    n, d = embeddings.shape
    device = embeddings.device
    n_select = max(0, min(int(n_select), n))
    if n_select == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    # The generator lives on CPU so a given seed picks the same points on CPU and CUDA.
    gen = torch.Generator().manual_seed(seed)
    x = embeddings.detach()
    proj = None
    if proj_dim is not None and 0 < proj_dim < d:
        proj = torch.randn(d, proj_dim, generator=gen) / math.sqrt(proj_dim)
        proj = proj.to(device)
    width = proj.shape[1] if proj is not None else d
    work = torch.empty(n, width, dtype=torch.float32, device=device)
    for s in range(0, n, chunk):
        block = x[s : s + chunk].float()
        work[s : s + chunk] = block @ proj if proj is not None else block
    # Centred: the loop's ||x||² - 2x·c + ||c||² cancels catastrophically in float32 when
    # the points lie far from the origin relative to their spread (near-duplicate patches);
    # distances do not change under the shift.
    mean = torch.zeros(width, dtype=torch.float64, device=device)
    for s in range(0, n, chunk):
        mean += work[s : s + chunk].sum(0, dtype=torch.float64)
    mean = (mean / n).float()
    sq_norms = torch.empty(n, dtype=torch.float32, device=device)
    for s in range(0, n, chunk):
        work[s : s + chunk] -= mean
        sq_norms[s : s + chunk] = work[s : s + chunk].square().sum(1)

    if init_dist is not None:
        min_dist = init_dist.to(device, torch.float32).clone()
        cur = torch.argmax(min_dist)
    else:
        min_dist = torch.full((n,), float("inf"), device=device)
        cur = torch.randint(n, (), generator=gen).to(device)
    n_cells = _n_cells(n, width, n_select)
    if prune and device.type == "cpu" and n_cells:  # on a GPU a full pass per pick is cheap
        return _greedy_cells(work, sq_norms, min_dist, cur, n_select, n_cells, cover)
    nearest = torch.full((n,), -1, dtype=torch.long, device=device) if cover is not None else None
    picks = _greedy_plain(work, sq_norms, min_dist, cur, n_select, nearest)[0]
    if cover is not None:
        cover.update(nearest=nearest, sq_dist=min_dist.clamp_min(0))
    return picks


def _greedy_plain(
    work: torch.Tensor,
    sq_norms: torch.Tensor,
    min_dist: torch.Tensor,
    cur: torch.Tensor,
    n_pick: int,
    nearest: torch.Tensor | None = None,
    first: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_pick`` farthest-point picks, each with a full pass over ``work``.

    Updates ``min_dist`` (and, if given, ``nearest``: the pick number, from ``first``, that
    set it) in place; returns the picks and the next start point, both device tensors (no
    host sync per pick).
    """
    selected = torch.empty(n_pick, dtype=torch.long, device=work.device)
    dist = torch.empty_like(min_dist)
    for i in range(n_pick):
        selected[i] = cur
        center = work.index_select(0, cur.view(1)).view(-1)
        # ||x||² - 2 x·c + ||c||² as one matrix-vector product (memory-bound, one pass).
        torch.addmv(sq_norms, work, center, alpha=-2.0, out=dist)
        dist += sq_norms.index_select(0, cur.view(1))
        if nearest is not None:
            nearest.masked_fill_(dist < min_dist, first + i)
        torch.minimum(min_dist, dist, out=min_dist)
        # Rounding can leave a picked point at a tiny positive distance; -inf makes sure it
        # is never picked again (which also keeps picks distinct on duplicated data).
        min_dist.index_fill_(0, cur.view(1), float("-inf"))
        cur = torch.argmax(min_dist)
    return selected, cur


#: Cell pruning splits N candidates into about this many times sqrt(N) cells (at most an
#: eighth of the picks, which are the plain loop's), and not below ``_MIN_CELLS``; below
#: ``_CELLS_MIN_SIZE`` values (N·D; 4 MB) the plain loop runs in cache and is faster.
_CELLS_PER_SQRT_N = 1.5
_MIN_CELLS = 16
_CELLS_MIN_SIZE = 1 << 20
#: Relative slack on the cell bounds, far above the float32 rounding of the distances they
#: compare, far below the distances themselves (a test checks that a wrong bound is caught).
_CELL_SLACK = 1e-5
#: When more than this share of the rows would need an update, the next ``_REPROBE_EVERY``
#: picks are plain full passes (isotropic high-dimensional data never prunes).
_DENSE_ABOVE = 0.5
_REPROBE_EVERY = 32


def _n_cells(n: int, d: int, n_select: int) -> int:
    """Cells for :func:`_greedy_cells`, or 0 where the plain loop is the better choice."""
    cells = min(math.ceil(_CELLS_PER_SQRT_N * math.sqrt(n)), n_select // 8)
    return cells if cells >= _MIN_CELLS and n * d >= _CELLS_MIN_SIZE else 0


def _ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(lo[i], hi[i])`` and the offset of each range in it."""
    lens = hi - lo
    offsets = np.cumsum(lens) - lens
    total = int(lens.sum())
    return np.arange(total) + np.repeat(lo - offsets, lens), offsets


def _greedy_cells(
    work: torch.Tensor,
    sq_norms: torch.Tensor,
    min_dist: torch.Tensor,
    cur: torch.Tensor,
    n_select: int,
    n_cells: int,
    cover: dict[str, torch.Tensor] | None = None,
    stats: dict[str, int] | None = None,
) -> torch.Tensor:
    """Farthest-point picks that update only the cells a new center can reach.

    The plain loop reads all N×D values per pick although, once the picks cover the data,
    a new center brings only its few nearest points closer. Here the first ``n_cells``
    picks run the plain loop (they cover the data coarsely) and their Voronoi cells split
    the rows; each cell (reference point m = its pick, rows contiguous in memory and sorted
    by d(x, m)) keeps the largest running min-distance ``best`` among its rows. A new center
    c can only bring x closer if d(x, c)² < best_x ≤ cellmax, and d(x, c) ≥ |d(c, m) -
    d(x, m)|, so per pick only the rows with |d(x, m) - d(c, m)| < sqrt(cellmax) (a
    contiguous slice of each cell, found by binary search; none in most cells) are measured,
    with direct float32 distances by index (faiss), and only the cells where some row got
    closer refresh their maximum. A pick costs O(cells·D + measured rows·D) instead of
    O(N·D); the next pick is the farthest row of the cell with the largest maximum. Where
    most rows would need measuring anyway (early picks, unstructured data) a few plain full
    passes run instead. The bounds carry a slack (``_CELL_SLACK``) for float rounding, so the
    picks equal the plain loop's up to float ties. ``cover``: as in :func:`greedy_coreset`.
    """
    if work.device.type != "cpu":
        raise ValueError("the cell-pruned greedy loop runs on CPU; use prune=False on a GPU")
    sync_faiss_threads()  # faiss's OpenMP pool runs the per-row distance pass below
    n, d = work.shape
    selected = np.empty(n_select, dtype=np.int64)
    nearest = torch.full((n,), -1, dtype=torch.long)
    first, cur = _greedy_plain(work, sq_norms, min_dist, cur, n_cells, nearest)
    selected[:n_cells] = first.numpy()
    owner = nearest.clone() if cover is not None else None  # before orphans join a cell

    # ---- cells: the Voronoi cells of the first picks, rows permuted cell by cell
    x = work.numpy()  # views of the same buffers, permuted in place below
    cell = nearest.numpy()
    orphan = np.flatnonzero(cell < 0)  # nearer to the init_dist set than to any pick
    if orphan.size:
        index = faiss.IndexFlatL2(d)
        index.add(x[selected[:n_cells]])
        cell[orphan] = index.search(x[orphan], 1)[1][:, 0]
    used, cell = np.unique(cell, return_inverse=True)  # a cell can be empty on duplicates
    cell = cell.astype(np.int64)
    refs = np.ascontiguousarray(x[selected[used]])
    c_total = refs.shape[0]
    to_ref = np.empty(n, dtype=np.float32)
    sp = faiss.swig_ptr
    faiss.fvec_L2sqr_by_idx(sp(to_ref), sp(x), sp(refs), sp(cell), d, n, 1)
    radius = np.sqrt(to_ref, dtype=np.float64)  # d(x, m), direct so exact to float rounding
    order = np.lexsort((radius, cell))
    cell, radius = cell[order], radius[order]
    perm = torch.from_numpy(order)
    work.copy_(work.index_select(0, perm))
    sq_norms.copy_(sq_norms[perm])
    min_dist.copy_(min_dist[perm])
    owner_np = None
    if owner is not None:
        owner = owner[perm]
        owner_np = owner.numpy()  # a view: the plain passes below update it too
    best = min_dist.numpy()
    starts = np.zeros(c_total + 1, dtype=np.int64)
    np.cumsum(np.bincount(cell, minlength=c_total), out=starts[1:])
    r_max = max(float(radius.max()), 1e-30)
    # Sorted search keys: cell j's rows lie in [4j, 4j + 1]; the queries of cell j are
    # clipped to [4j - 1, 4j + 2], so they never reach into another cell.
    keys = cell * 4.0 + radius / r_max
    key_base = np.arange(c_total) * 4.0
    cell_r = np.maximum.reduceat(radius, starts[:-1])
    cell_max = np.empty(c_total)
    half = np.empty(c_total)  # annulus half-width sqrt(cellmax) + slack, in units of r_max
    reach2 = np.empty(c_total, dtype=np.float32)  # cells with d(c, m)² above this are skipped
    margin = _CELL_SLACK * r_max

    def refresh(cells: np.ndarray | slice, values: np.ndarray, offsets: np.ndarray) -> None:
        """Max of ``best`` over ``cells`` (``values``: their rows, cell by cell) and bounds."""
        cell_max[cells] = np.maximum.reduceat(values, offsets)
        s = np.sqrt(np.maximum(cell_max[cells], 0.0)) * (1.0 + _CELL_SLACK) + margin
        half[cells] = s / r_max
        reach2[cells] = np.square(cell_r[cells] + s)

    refresh(slice(None), best, starts[:-1])
    to_refs = np.empty(c_total, dtype=np.float32)
    dist = np.empty(n, dtype=np.float32)
    counts = {"cell_picks": 0, "dense_picks": 0, "rows": 0, "cells_skipped": 0}

    # ---- picks
    # faiss's distance-by-index kernels would fork an OpenMP team for every pick; one
    # thread (this thread's setting only) is faster and immune to busy cores. faiss and
    # torch may share one OpenMP runtime, so torch's thread count is restored after.
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    try:
        i, cur_i = n_cells, int(np.flatnonzero(order == int(cur))[0])
        while i < n_select:
            c = x[cur_i]
            faiss.fvec_L2sqr_ny(sp(to_refs), sp(c), sp(refs), d, c_total)
            near = np.flatnonzero(to_refs <= reach2)
            dc = np.sqrt(to_refs[near], dtype=np.float64) / r_max
            lo = keys.searchsorted(key_base[near] + np.maximum(dc - half[near], -1.0))
            hi = keys.searchsorted(key_base[near] + np.minimum(dc + half[near], 2.0), "right")
            np.maximum(hi, lo, out=hi)  # (only a negative _CELL_SLACK, in a test, inverts them)
            m = int((hi - lo).sum())
            if m > _DENSE_ABOVE * n:
                run = min(_REPROBE_EVERY, n_select - i)
                picks, nxt = _greedy_plain(
                    work, sq_norms, min_dist, torch.tensor(cur_i), run, owner, i
                )
                selected[i : i + run] = order[picks.numpy()]
                i, cur_i = i + run, int(nxt)
                refresh(slice(None), best, starts[:-1])
                counts["dense_picks"] += run
                continue
            selected[i] = order[cur_i]
            rows, _ = _ranges(lo, hi)
            faiss.fvec_L2sqr_by_idx(sp(dist), sp(c), sp(x), sp(rows), d, 1, m)
            closer = dist[:m] < best[rows]
            changed = rows[closer]
            best[changed] = dist[:m][closer]
            if owner_np is not None:
                owner_np[changed] = i
            best[cur_i] = -np.inf  # never picked again, even at a rounded distance > 0
            cells = np.union1d(cell[changed], cell[cur_i])
            in_cells, offsets = _ranges(starts[cells], starts[cells + 1])
            refresh(cells, best[in_cells], offsets)
            j = int(np.argmax(cell_max))
            cur_i = int(starts[j] + np.argmax(best[starts[j] : starts[j + 1]]))
            i += 1
            counts["cell_picks"] += 1
            counts["rows"] += m
            counts["cells_skipped"] += c_total - int(np.count_nonzero(hi > lo))
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    if stats is not None:
        stats.update(counts, cells=c_total)
    if cover is not None:  # back to the input's row order
        back = torch.from_numpy(np.argsort(order))
        cover.update(nearest=owner[back], sq_dist=min_dist[back].clamp_min(0))
    return torch.from_numpy(selected)
