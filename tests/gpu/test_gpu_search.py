"""The bank search on the GPU equals the exact fp32 search (fp32 and fp16 pre-selection, and
the cell search)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from mspray.bank import PatchBank
from mspray.bank.search import CellSearch, TorchSearch
from mspray.config import BankConfig


def _direct_fp32(q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = [(q[s : s + 256, None] - b[None]).square().sum(-1).amin(1) for s in range(0, len(q), 256)]
    return torch.cat(out).sqrt()


def _clustered(n: int, d: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(64, d, generator=g) * 4 + offset
    return centers[torch.randint(64, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "cells"])
@pytest.mark.parametrize("offset", [0.0, 500.0])
def test_gpu_search_equals_exact_fp32(precision: str, offset: float) -> None:
    b = _clustered(20000, 64, 0, offset)
    q = torch.cat([_clustered(8000, 64, 1, offset), b[:500], b[:500].repeat(2, 1)])
    s = CellSearch(b, "cuda") if precision == "cells" else TorchSearch(b, "cuda", precision)
    got = s.search(q.cuda())
    assert got.is_cuda
    assert torch.equal(got, _direct_fp32(q.cuda(), b.cuda()))
    index = faiss.IndexFlatL2(64)
    index.add(b.numpy())
    ref = np.sqrt(np.maximum(index.search(q.numpy(), 1)[0][:, 0], 0))
    tol = 1e-3 * (1 + offset)  # faiss's uncentred expansion rounds at |x|²·2⁻²⁴
    np.testing.assert_allclose(got.cpu().numpy(), ref, rtol=1e-3, atol=tol)


def test_bank_searcher_on_gpu_matches_cpu() -> None:
    x = _clustered(5000, 64, 2).numpy()
    q = _clustered(3000, 64, 3)
    bank = PatchBank.build(x, BankConfig(coreset_ratio=1.0))
    gpu = bank.searcher("cuda", "fp16").search(q.cuda()).cpu()
    cpu = bank.searcher("cpu", "fp32").search(q)
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)


def test_greedy_coreset_on_gpu_matches_cpu() -> None:
    from mspray.bank.coreset import greedy_coreset

    x = _clustered(20000, 64, 4)
    sel = greedy_coreset(x.cuda(), 200, seed=0)
    ref = greedy_coreset(x, 200, seed=0)
    # same seed, same start; rounding may reorder near-ties, so compare as sets
    assert sel.is_cuda and len(set(sel.tolist()) & set(ref.tolist())) >= 180
