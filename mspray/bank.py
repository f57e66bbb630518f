"""Nearest-neighbour bank of training patch embeddings (one per scale).

A :class:`PatchBank` wraps one faiss index (exact ``IndexFlatL2`` or approximate
``IndexIVFFlat``) and answers the only question inference asks: the minimum L2 distance of
each query patch embedding to the bank. Banks are optionally reduced with a PatchCore-style
greedy k-center coreset (:func:`greedy_coreset`), and serialise to plain bytes with faiss's
own format (never pickle), so a bundle can be loaded without executing code.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import faiss
import numpy as np
import torch

from mspray.config import BankConfig

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

#: faiss's k-means warns below this many training points per centroid.
_MIN_POINTS_PER_CENTROID = 39

_gpu_lock = threading.Lock()
_gpu_resources: Any = None
_warned_no_gpu = False


# ---------------------------------------------------------------------- helpers
def _sync_threads() -> None:
    """Give faiss's OpenMP pool torch's thread count.

    faiss ships its own OpenMP runtime, which defaults to every core of the machine; inside a
    Ray worker (or with ``torch.set_num_threads``) that oversubscribes the CPUs it was given.
    """
    n = torch.get_num_threads()
    if faiss.omp_get_max_threads() != n:
        faiss.omp_set_num_threads(n)


def _as_f32(x: ArrayLike) -> np.ndarray:
    """C-contiguous float32 numpy copy/view of a numpy array or a tensor on any device."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_2d(x: ArrayLike, dim: int | None, what: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{what}: expected an N×D array, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what}: expected dimension {dim}, got {x.shape[1]}")


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _to_gpu(index: faiss.Index) -> faiss.Index:
    """Move ``index`` to GPU 0, sharing one StandardGpuResources per process.

    One resources object per bank would each reserve a slice of GPU memory for scratch; a
    shared one is fine as long as calls do not overlap, which ``_gpu_lock`` guarantees.
    """
    global _gpu_resources
    with _gpu_lock:
        if _gpu_resources is None:
            _gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(_gpu_resources, 0, index)


def _want_gpu(cfg: BankConfig) -> bool:
    """True when the index should live on GPU; logs once when asked for but unavailable."""
    global _warned_no_gpu
    if not cfg.use_gpu:
        return False
    if _gpu_available():
        return True
    if not _warned_no_gpu:
        log.warning("bank.use_gpu is set but faiss has no GPU support here; using CPU faiss")
        _warned_no_gpu = True
    return False


def _is_gpu_index(index: faiss.Index) -> bool:
    return type(index).__name__.startswith("Gpu")


def _ivf_nlist(cfg: BankConfig, n: int) -> int:
    """cfg.ivf_nlist, clipped so k-means has enough points per centroid for a small bank."""
    return max(1, min(cfg.ivf_nlist, n // _MIN_POINTS_PER_CENTROID))


# ---------------------------------------------------------------------- coreset
def greedy_coreset(
    embeddings: torch.Tensor,
    n_select: int,
    seed: int = 0,
    proj_dim: int | None = None,
    chunk: int = 65536,
    init_dist: torch.Tensor | None = None,
    prune: bool = True,
) -> torch.Tensor:
    """Greedy k-center (farthest point) selection, as in PatchCore.

    Starts from a random point (or, with ``init_dist``, from the point farthest from an
    existing set), then repeatedly adds the point farthest from everything selected so far.
    One batched distance update per pick keeps a running min-distance vector, so the cost is
    O(N·D) per pick and runs on the input's device (CPU or CUDA).

    Args:
        embeddings: N×D tensor.
        n_select: number of points to pick (clipped to N).
        seed: seeds the start point and the projection; the result is deterministic.
        proj_dim: if set and < D, distances are computed after a Gaussian random projection
            to this many dimensions (Johnson–Lindenstrauss), which is much cheaper for big D.
        chunk: rows per block for the projection and norm passes (bounds temporaries).
        init_dist: optional N squared distances to an already-selected set (in the same,
            possibly projected, space), used to extend an existing bank incrementally.
        prune: skip distance updates the triangle inequality proves useless
            (:func:`_greedy_pruned`, CPU only; same picks up to float ties, faster on
            data of low intrinsic dimension such as patch embeddings); ``False`` (and any
            GPU) runs the plain loop, one full matrix-vector product per pick.

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
    sq_norms = torch.empty(n, dtype=torch.float32, device=device)
    for s in range(0, n, chunk):
        sq_norms[s : s + chunk] = work[s : s + chunk].square().sum(1)

    if init_dist is not None:
        min_dist = init_dist.to(device, torch.float32).clone()
        cur = torch.argmax(min_dist)
    else:
        min_dist = torch.full((n,), float("inf"), device=device)
        cur = torch.randint(n, (), generator=gen).to(device)
    if prune and device.type == "cpu":  # on a GPU the plain loop's full pass is cheap
        return _greedy_pruned(work, sq_norms, min_dist, cur, n_select)
    selected = torch.empty(n_select, dtype=torch.long, device=device)
    dist = torch.empty(n, dtype=torch.float32, device=device)
    for i in range(n_select):
        # `cur` stays a device tensor: no host sync per pick on CUDA.
        selected[i] = cur
        center = work.index_select(0, cur.view(1)).view(-1)
        # ||x||² - 2 x·c + ||c||² as one matrix-vector product (memory-bound, one pass).
        torch.addmv(sq_norms, work, center, alpha=-2.0, out=dist)
        dist += sq_norms.index_select(0, cur.view(1))
        torch.minimum(min_dist, dist, out=min_dist)
        # Rounding can leave a picked point at a tiny positive distance; -inf makes sure it
        # is never picked again (which also keeps picks distinct on duplicated data).
        min_dist.index_fill_(0, cur.view(1), float("-inf"))
        cur = torch.argmax(min_dist)
    return selected


#: Pruning keeps a point out of a distance update only when the triangle inequality proves
#: the new center is at least this factor (squared: 4 = 2²) times its current distance away
#: from its nearest center, plus a margin for float rounding of the squared expansions.
_PRUNE_FACTOR = 4.0 * (1.0 + 1e-3)
#: Above this share of points passing the test, update all points densely instead, and
#: test again every ``_REPROBE_EVERY`` picks (isotropic high-dimensional data never prunes).
_DENSE_ABOVE = 0.25
_REPROBE_EVERY = 32


def _greedy_pruned(
    work: torch.Tensor,
    sq_norms: torch.Tensor,
    min_dist: torch.Tensor,
    cur: torch.Tensor,
    n_select: int,
) -> torch.Tensor:
    """Farthest-point picks with the triangle inequality (Elkan-style) pruning.

    Every point remembers its nearest selected center ``a``. A new center ``c`` can only
    bring a point ``x`` closer when ``d(c, a) < 2·d(x, a)`` (else ``d(x, c) ≥ d(c, a) -
    d(x, a) ≥ d(x, a)``), so each pick computes distances from ``c`` to the k centers so far
    (k×D, small) and to the points that pass that test only, instead of to all N points. As
    the covering radius shrinks, fewer points pass; the picks equal the plain loop's up to
    float ties. Points whose nearest center is outside this run (``init_dist`` from an
    existing bank) are always updated until a new center claims them.
    """
    if work.device.type != "cpu":
        raise ValueError("the pruned greedy loop runs on CPU; use prune=False on a GPU")
    # numpy: the loop is many small 1-D gathers, which numpy runs at a fraction of the
    # per-call overhead of torch's (multi-threaded) indexing kernels.
    x = work.numpy()
    norms = sq_norms.numpy()
    best = min_dist.numpy()
    n, d = x.shape
    cur_i = int(cur)
    selected = np.empty(n_select, dtype=np.int64)
    centers = np.empty((n_select, d), dtype=np.float32)
    center_sq = np.empty(n_select, dtype=np.float32)
    # squared distance of the newest center to each earlier center; the last slot is the
    # "no center yet" sentinel, -inf, so such points always pass the pruning test.
    to_new = np.full(n_select + 1, -np.inf, dtype=np.float32)
    nearest = np.full(n, n_select, dtype=np.int64)
    # torch views of the same buffers for the dense update (a 2-thread addmv)
    work_t, best_t, nearest_t = work, min_dist, torch.from_numpy(nearest)
    dist_t = torch.empty(n, dtype=torch.float32)
    frac = 0.0  # share of points that passed the last pruning test
    for i in range(n_select):
        selected[i] = cur_i
        c = x[cur_i]
        c_sq = norms[cur_i]
        centers[i] = c
        center_sq[i] = c_sq
        if i:
            to_new[:i] = center_sq[:i] - 2.0 * (centers[:i] @ c) + c_sq
        if frac > _DENSE_ABOVE and i % _REPROBE_EVERY:
            # Most points pass the test (high intrinsic dimension, or early picks): a plain
            # full update is cheaper than gathering them; test again every few picks.
            torch.addmv(sq_norms, work_t, torch.from_numpy(c), alpha=-2.0, out=dist_t)
            dist_t += float(c_sq)
            closer = dist_t < best_t
            nearest_t.masked_fill_(closer, i)
            torch.minimum(best_t, dist_t, out=best_t)
        else:
            # points the new center may bring closer (always those without a center yet)
            cand = np.flatnonzero(to_new[nearest] < _PRUNE_FACTOR * best)
            frac = cand.size / n
            if cand.size:
                dist = norms[cand] - 2.0 * (x[cand] @ c) + c_sq
                closer = dist < best[cand]
                upd = cand[closer]
                best[upd] = dist[closer]
                nearest[upd] = i
        # Rounding can leave a picked point at a tiny positive distance; -inf makes sure it
        # is never picked again (and keeps picks distinct on duplicated data).
        best[cur_i] = -np.inf
        cur_i = int(np.argmax(best))
    return torch.from_numpy(selected)


# ---------------------------------------------------------------------- bank
class PatchBank:
    """One faiss index of float32 patch embeddings answering min-L2-distance queries."""

    def __init__(self, index: faiss.Index, cfg: BankConfig) -> None:
        self.index = index
        self.cfg = cfg

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, embeddings: ArrayLike, cfg: BankConfig, seed: int = 0) -> PatchBank:
        """Build a bank from N×D embeddings: optional coreset, then the configured index."""
        _check_2d(embeddings, None, "embeddings")
        x = _select(embeddings, cfg, seed)
        n, d = x.shape
        if n == 0:
            raise ValueError("embeddings: cannot build a bank from zero vectors")
        _sync_threads()
        if cfg.index == "flat":
            index = faiss.IndexFlatL2(d)
        elif cfg.index == "ivf":
            nlist = _ivf_nlist(cfg, n)
            # index_factory owns its quantizer, so no Python reference has to keep it alive.
            index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_L2)
            index.train(x)
            index.nprobe = min(cfg.ivf_nprobe, nlist)
        else:
            raise ValueError(f"bank.index={cfg.index!r}: expected 'flat' or 'ivf'")
        index.add(x)
        if _want_gpu(cfg):
            index = _to_gpu(index)
        return cls(index, cfg)

    def add(self, embeddings: ArrayLike, cfg: BankConfig | None = None) -> int:
        """Append embeddings; returns how many were added.

        Without ``cfg`` every row is added. With ``cfg`` and ``cfg.coreset_ratio < 1`` the new
        rows are first reduced like :meth:`build` does, except that the greedy picks start
        from the existing bank (farthest from bank and earlier picks), so appended points
        extend the coverage instead of duplicating it. IVF banks use their trained quantizer.
        """
        _check_2d(embeddings, self.dim, "embeddings")
        if embeddings.shape[0] == 0:
            return 0
        if cfg is not None:
            x = _select(embeddings, cfg, seed=self.ntotal, bank=self)
        else:
            x = _as_f32(embeddings)
        _sync_threads()
        self._locked(self.index.add, x)
        return x.shape[0]

    # ------------------------------------------------------------------ queries
    def search(self, queries: ArrayLike) -> np.ndarray:
        """Min L2 distance of each of M queries (M×D, numpy or tensor on any device) to the
        bank, as M float32. Runs ``cfg.search_chunk`` queries per faiss call."""
        _check_2d(queries, self.dim, "queries")
        m = queries.shape[0]
        out = np.empty(m, dtype=np.float32)
        if m == 0:
            return out
        _sync_threads()
        step = self.cfg.search_chunk
        for s in range(0, m, step):
            # Convert per chunk, so a large GPU tensor is never copied to host in one piece.
            q = _as_f32(queries[s : s + step])
            sq, _ = self._locked(self.index.search, q, 1)
            out[s : s + q.shape[0]] = sq[:, 0]
        # faiss returns squared distances; the expansion ||x||²+||y||²-2x·y can round below 0.
        np.maximum(out, 0.0, out=out)
        return np.sqrt(out, out=out)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def on_gpu(self) -> bool:
        return _is_gpu_index(self.index)

    def vectors(self) -> np.ndarray:
        """The stored vectors (ntotal × dim) in insertion order, for tests and diagnostics."""
        cpu = self._cpu_index()
        if isinstance(cpu, faiss.IndexIVF):
            # reconstruct needs an id -> list map; build it on a copy, not the live index.
            cpu = faiss.clone_index(cpu)
            cpu.make_direct_map()
        return cpu.reconstruct_n(0, cpu.ntotal)

    # ------------------------------------------------------------------ serialisation
    def to_bytes(self) -> bytes:
        """faiss's own serialisation of the (CPU copy of the) index."""
        return faiss.serialize_index(self._cpu_index()).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, cfg: BankConfig) -> PatchBank:
        """Load :meth:`to_bytes` output; IVF nprobe and GPU placement come from ``cfg``."""
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as e:
            raise ValueError(f"not a valid faiss index: {e}") from e
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = min(cfg.ivf_nprobe, index.nlist)
        elif not isinstance(index, faiss.IndexFlatL2):
            raise ValueError(f"unsupported bank index type {type(index).__name__}")
        if _want_gpu(cfg):
            index = _to_gpu(index)
        return cls(index, cfg)

    # ------------------------------------------------------------------ internals
    def _cpu_index(self) -> faiss.Index:
        if self.on_gpu:
            with _gpu_lock:
                return faiss.index_gpu_to_cpu(self.index)
        return self.index

    def _locked(self, fn: Any, *args: Any) -> Any:
        """Call ``fn``; GPU indexes share one resources object, so serialise their calls."""
        if self.on_gpu:
            with _gpu_lock:
                return fn(*args)
        return fn(*args)

    def __repr__(self) -> str:
        kind, where = type(self.index).__name__, "gpu" if self.on_gpu else "cpu"
        return f"PatchBank({kind}, ntotal={self.ntotal}, dim={self.dim}, {where})"


def _select(
    embeddings: ArrayLike, cfg: BankConfig, seed: int, bank: PatchBank | None = None
) -> np.ndarray:
    """Rows kept for the bank: all of them, or a greedy coreset of ceil(ratio·N) rows (at
    most ``cfg.coreset_max_size``) picked among at most ``cfg.coreset_max_candidates`` random
    candidates (bounds the O(N·M) cost).
    With ``bank``, picks start from the existing bank's coverage."""
    x = _as_f32(embeddings)
    n = x.shape[0]
    if cfg.coreset_ratio >= 1.0 or n == 0:
        return x
    n_target = min(math.ceil(cfg.coreset_ratio * n), cfg.coreset_max_size)
    if n > cfg.coreset_max_candidates:
        rng = np.random.default_rng(seed)
        cand = np.sort(rng.choice(n, size=cfg.coreset_max_candidates, replace=False))
        x = x[cand]
    n_select = min(n_target, x.shape[0])
    # The greedy loop is one matrix-vector product per pick: worth a GPU when one is allowed.
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    xt = torch.from_numpy(x).to(device)
    init = None
    if bank is not None and bank.ntotal > 0:
        init = torch.from_numpy(bank.search(x)).to(device).square()
    picked = greedy_coreset(xt, n_select, seed=seed, init_dist=init)
    return x[np.sort(picked.cpu().numpy())]
