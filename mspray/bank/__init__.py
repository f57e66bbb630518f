"""Nearest-neighbour bank of training patch embeddings (one per scale).

A :class:`PatchBank` wraps one faiss index (exact ``IndexFlatL2`` or approximate
``IndexIVFFlat``) and answers the only question inference asks: the minimum L2 distance of
each query patch embedding to the bank. Banks are optionally reduced with a PatchCore-style
greedy k-center coreset (:mod:`mspray.bank.coreset`), and serialise to plain bytes with faiss's own
format (never pickle), so a bundle can be loaded without executing code.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import faiss
import numpy as np
import torch

from mspray.bank.coreset import greedy_coreset
from mspray.bank.search import CellSearch, TorchSearch, sync_faiss_threads
from mspray.config import BankConfig

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

#: faiss's k-means warns below this many training points per centroid.
_MIN_POINTS_PER_CENTROID = 39

_gpu_lock = threading.Lock()
_gpu_resources: Any = None
_warned_no_gpu = False


# ---------------------------------------------------------------------- helpers
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


# ---------------------------------------------------------------------- bank


def shard_keep_ratio(cfg: BankConfig, total_rows: int) -> float:
    """Fraction of each shard's patches kept by the per-shard coreset: 1 while all patches
    fit the global candidate budget, else ``coreset_max_candidates / total_rows``, so that
    at most the budget (plus one row per shard, from rounding) ever reaches the driver,
    however many images there are."""
    if cfg.coreset_ratio >= 1.0 or total_rows <= cfg.coreset_max_candidates:
        return 1.0
    return cfg.coreset_max_candidates / total_rows


def global_bank_config(cfg: BankConfig, total_rows: int, union_rows: int) -> BankConfig:
    """Bank config for the global coreset over ``union_rows`` shard-reduced rows, so that it
    keeps ``ceil(coreset_ratio × total_rows)`` of them, as a one-step coreset would."""
    if cfg.coreset_ratio >= 1.0 or union_rows == total_rows or union_rows == 0:
        return cfg
    target = math.ceil(cfg.coreset_ratio * total_rows)
    return cfg.replace(coreset_ratio=min(1.0, target / union_rows))


class PatchBank:
    """One faiss index of float32 patch embeddings answering min-L2-distance queries."""

    def __init__(self, index: faiss.Index, cfg: BankConfig) -> None:
        self.index = index
        self.cfg = cfg
        self._searchers: dict[tuple[str, str, int, bool], TorchSearch] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, embeddings: ArrayLike, cfg: BankConfig, seed: int = 0) -> PatchBank:
        """Build a bank from N×D embeddings: optional coreset, then the configured index."""
        _check_2d(embeddings, None, "embeddings")
        x = _select(embeddings, cfg, seed)
        n, d = x.shape
        if n == 0:
            raise ValueError("embeddings: cannot build a bank from zero vectors")
        sync_faiss_threads()
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
        sync_faiss_threads()
        self._locked(self.index.add, x)
        self._searchers.clear()
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
        sync_faiss_threads()
        step = self.cfg.search_chunk
        for s in range(0, m, step):
            # Convert per chunk, so a large GPU tensor is never copied to host in one piece.
            q = _as_f32(queries[s : s + step])
            sq, _ = self._locked(self.index.search, q, 1)
            out[s : s + q.shape[0]] = sq[:, 0]
        # faiss returns squared distances; the expansion ||x||²+||y||²-2x·y can round below 0.
        np.maximum(out, 0.0, out=out)
        return np.sqrt(out, out=out)

    def searcher(
        self,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        candidates: int = 8,
        cells: bool = False,
    ) -> TorchSearch:
        """The exact torch search of this bank's vectors on ``device``: the cell search with
        ``cells`` (fp32; ``precision`` and ``candidates`` unused), else the dense one (built
        once per setting; rebuilt after :meth:`add`)."""
        key = (str(torch.device(device)), precision, int(candidates), bool(cells))
        if key not in self._searchers:
            if cells:
                self._searchers[key] = CellSearch(self.vectors(), device)
            else:
                self._searchers[key] = TorchSearch(self.vectors(), device, precision, candidates)
        return self._searchers[key]

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
