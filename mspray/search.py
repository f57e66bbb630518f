"""Nearest-neighbour search of a bank on the encoders' device (torch), and faiss helpers.

:class:`TorchSearch` answers the bank's one question (the minimum L2 distance of each query
to the bank) with matrix products on any torch device:

1. pre-selection: bank and queries are centred on the bank mean, and one product of
   ``[q, 1, |q|²]`` with ``[-2b, |b|², 1]`` gives approximate squared distances in the
   pre-selection precision (bf16 on CPUs with native bf16, fp16 on CUDA, else fp32); the
   ``k`` smallest per query are the candidates;
2. exact re-ranking: the candidates' distances are measured directly, ``Σ (q - b)²`` in fp32;
3. a bound on the pre-selection's rounding error says whether the nearest point is sure
   to be among the candidates (the ``k``-th approximate value lies more than twice the bound
   above the first); the rows where it is not (near ties, duplicated bank rows) are searched
   again in fp32, and every bank row within the fp32 bound of their minimum is measured
   directly. The result therefore equals the exact fp32 search, ties included.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import torch

#: Unit roundoff (half an ulp, relative) of the pre-selection dtypes.
_ROUNDOFF = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
#: Pre-selection score matrices are computed in tiles of about this many entries.
_TILE_ENTRIES = 1 << 22
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Bank rows per group of the two-level candidate selection.
_GROUP = 32
#: Score of the pad rows that fill the last group (the bank is scaled to radius ~1, so real
#: scores stay below ~10; fp16 holds this).
_PAD = 1.0e4


def sync_faiss_threads() -> None:
    """Give faiss's OpenMP pool torch's thread count.

    faiss ships its own OpenMP runtime, which defaults to every core of the machine; inside a
    Ray worker (or with ``torch.set_num_threads``) that oversubscribes the CPUs it was given.
    """
    n = torch.get_num_threads()
    if faiss.omp_get_max_threads() != n:
        faiss.omp_set_num_threads(n)


class TorchSearch:
    """Exact min-L2 search of a fixed bank on one torch device (see the module docstring).

    Args:
        vectors: the bank, ``N×D`` (numpy or tensor).
        device: where the bank lives and the search runs.
        precision: pre-selection precision, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        candidates: pre-selected candidates per query that are re-ranked exactly.
    """

    def __init__(
        self,
        vectors: np.ndarray | torch.Tensor,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        candidates: int = 8,
    ) -> None:
        if precision not in _DTYPES:
            raise ValueError(f"precision={precision!r}: expected fp32, bf16 or fp16")
        self.device = torch.device(device)
        self.dtype = _DTYPES[precision]
        b = torch.as_tensor(vectors).to(self.device, torch.float32).contiguous()
        if b.ndim != 2 or b.shape[0] == 0:
            raise ValueError(f"bank: expected a non-empty N×D array, got {tuple(b.shape)}")
        n, d = b.shape
        self.vectors = b
        self.k = max(1, min(int(candidates), n))
        # Centring shrinks the norms the rounding errors scale with (the expansion
        # |q|² + |b|² - 2q·b loses precision far from the origin); a power-of-two scale
        # (exact) brings the radius near 1, so fp16 cannot overflow.
        self.mean = b.double().mean(0).float()
        bc = b - self.mean
        r = float(bc.square().sum(1).max().sqrt())
        self.scale = 2.0 ** -round(np.log2(r)) if r > 0 else 1.0
        bc = bc * self.scale
        sq = bc.square().sum(1, keepdim=True)
        self.radius = float(sq.max().sqrt())  # max |b - mean|, scaled
        # Candidates come from the best groups of _GROUP consecutive rows: per-group minima
        # are an element-wise min over slabs of the score tile (fast, vectorised), and a top-k
        # over groups is _GROUP times smaller than over rows. Pad rows score _PAD.
        self.groups = -(-n // _GROUP)
        aug = torch.zeros(self.groups * _GROUP, d + 2, device=self.device)
        aug[:n, :d] = -2.0 * bc
        aug[:n, d] = sq[:, 0]
        aug[:n, d + 1] = 1.0
        aug[n:, d] = _PAD
        self._aug32 = aug
        self._aug = aug.to(self.dtype)
        self.tile = min(1024, max(64, _TILE_ENTRIES // aug.shape[0]))
        self.k_groups = min(self.k, self.groups)

    @property
    def ntotal(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(self, queries: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Min L2 distance of each of ``M×D`` queries to the bank: ``M`` float32 on the
        search device."""
        q = torch.as_tensor(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries: expected M×{self.dim}, got {tuple(q.shape)}")
        out = torch.empty(q.shape[0], dtype=torch.float32, device=self.device)
        starts = list(range(0, q.shape[0], self.tile))
        threads = torch.get_num_threads() if self.device.type == "cpu" else 1

        def run(part: list[int]) -> None:
            with torch.inference_mode():
                for s in part:
                    chunk = q[s : s + self.tile].to(self.device, torch.float32)
                    out[s : s + self.tile] = self._search_tile(chunk)

        if threads > 1 and len(starts) > 1:
            # One thread per core, each running whole tiles single-threaded: a tile is a
            # dozen small ops, and an OpenMP barrier per op stalls whenever one of the cores
            # is busy with another process (measured 5-17x slower on a loaded machine).
            parts = [starts[i::threads] for i in range(threads)]
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(run, parts))
            finally:
                torch.set_num_threads(threads)
        else:
            run(starts)
        return out.clamp_min_(0).sqrt_()

    # ------------------------------------------------------------------ internals
    def _augment(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[q', 1, |q'|²]`` with ``q' = (q - mean)·scale``, and ``|q'|``."""
        qc = (q - self.mean) * self.scale
        sq = qc.square().sum(1, keepdim=True)
        return torch.cat([qc, torch.ones_like(sq), sq], 1), sq.sqrt().squeeze(1)

    def _bound(self, qnorm: torch.Tensor, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Upper bound on |pre-selected value - direct fp32 squared distance| per query
        (scaled units).

        Rounding the inputs to ``dtype`` moves ``-2q·b`` by at most ``4u·|q||b|`` and ``|b|²``
        by ``u·|b|²``; the output is rounded once more (``u·|value|``); fp32 accumulation and
        the direct fp32 measure each add at most ``(D + 3)·2⁻²⁴·(|q| + |b|)²``; a quarter more
        covers the second-order terms (products of two roundings) with room to spare.
        """
        u = _ROUNDOFF[dtype]
        r = self.radius
        acc = (self.dim + 3) * 2.0**-24 * (qnorm + r).square()
        return 1.25 * (4 * u * qnorm * r + u * r * r + u * value.abs() + 2 * acc)

    def _search_tile(self, q: torch.Tensor) -> torch.Tensor:
        """Squared min distances of one tile of ``T`` queries (fp32, on the device)."""
        qa, qnorm = self._augment(q)
        t = q.shape[0]
        half = self.dtype != torch.float32
        if half:
            # Non-negative 2-byte floats order like their bits read as int16, and integer min
            # and top-k run several times faster than bf16 ones on CPU. An offset above every
            # rounding error (added through the |q|² column) keeps the scores >= 0.
            top = qnorm.max()
            offset = 2 * self._bound(top, (top + self.radius).square() + top.square(), self.dtype)
            qa = qa.clone()
            qa[:, -1] += offset
        scores = (self._aug @ qa.to(self.dtype).T).view(self.groups, _GROUP, t)
        keys = scores.view(torch.int16) if half else scores
        gmin, gidx = keys.amin(1).topk(self.k_groups, dim=0, largest=False)  # kg×T
        cols = torch.arange(t, device=q.device)
        # the best groups' scores, T×(kg·G) (advanced indices first: kg×T×G)
        inner = keys[gidx, :, cols].transpose(0, 1).reshape(t, -1)
        vals, pos = inner.topk(self.k, dim=1, largest=False)
        if half:
            gmin, vals = gmin.view(self.dtype), vals.view(self.dtype)
        rows = gidx.T.gather(1, pos // _GROUP) * _GROUP + pos % _GROUP  # T×k bank rows
        exact = (q[:, None, :] - self.vectors[rows.clamp_max(self.ntotal - 1)]).square()
        exact = exact.sum(-1).amin(1)
        if self.k == self.ntotal:
            return exact  # every row was measured directly
        low, gmin, vals = gmin[0].float(), gmin[-1].float(), vals[:, -1].float()
        margin = 2 * self._bound(qnorm, low.abs().maximum(vals.abs()), self.dtype)
        # Sure when every group not taken, and every row of the groups taken that is not a
        # candidate, scores beyond the nearest's possible error.
        sure = (vals - low > margin) & ((gmin - low > margin) | (self.k_groups == self.groups))
        if not bool(sure.all()):
            unsure = (~sure).nonzero().squeeze(1)
            qa32, _ = self._augment(q[unsure])
            exact[unsure] = self._exhaustive(q[unsure], qa32, qnorm[unsure])
        return exact

    def _exhaustive(self, q: torch.Tensor, qa: torch.Tensor, qnorm: torch.Tensor) -> torch.Tensor:
        """Exact squared min distances of the rows pre-selection could not decide: an fp32
        pass, then every bank row within its error bound of the minimum measured directly."""
        approx = qa @ self._aug32[: self.ntotal].T
        low = approx.amin(1)
        near = approx <= (low + 2 * self._bound(qnorm, low, torch.float32))[:, None]
        r, c = near.nonzero(as_tuple=True)
        d = (q[r] - self.vectors[c]).square().sum(1)
        out = torch.full((q.shape[0],), float("inf"), device=q.device)
        return out.scatter_reduce_(0, r, d, reduce="amin")

    def __repr__(self) -> str:
        return (
            f"TorchSearch(ntotal={self.ntotal}, dim={self.dim}, {self.device}, "
            f"{self.dtype}, candidates={self.k})"
        )
