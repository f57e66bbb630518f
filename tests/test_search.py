"""Tests for mspray.bank.search: the torch searches (dense, with an fp32 or bf16 pre-selection, and
by cells) equal the exact fp32 search (faiss flat and a float64 brute force agree with it),
ties and duplicated rows included."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

import mspray.bank.search as search_mod
from mspray.bank.search import CellSearch, TorchSearch

#: dense searches by pre-selection precision, and the cell search
PRECISIONS = ["fp32", "bf16", "cells"]


def _direct_fp32(q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact fp32 search: min over the bank of ``Σ (q - b)²`` in fp32, then sqrt."""
    out = [(q[s : s + 128, None] - b[None]).square().sum(-1).amin(1) for s in range(0, len(q), 128)]
    return torch.cat(out).sqrt()


def _float64(q: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return torch.cdist(q.double(), b.double()).min(1).values.numpy()


def _faiss_flat(q: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    index = faiss.IndexFlatL2(b.shape[1])
    index.add(b.numpy())
    return np.sqrt(np.maximum(index.search(q.numpy(), 1)[0][:, 0], 0))


def _clustered(n: int, d: int, k: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 4 + offset
    return centers[torch.randint(k, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)


def _searcher(b: torch.Tensor, precision: str, candidates: int = 8) -> TorchSearch:
    if precision == "cells":
        return CellSearch(b, cell_rows=32)  # small cells: many of them on these banks
    return TorchSearch(b, precision=precision, candidates=candidates)


def _check(q: torch.Tensor, b: torch.Tensor, precision: str, candidates: int = 8) -> None:
    got = _searcher(b, precision, candidates).search(q)
    assert got.dtype == torch.float32 and got.shape == (len(q),)
    assert torch.equal(got, _direct_fp32(q, b))
    np.testing.assert_allclose(got.numpy(), _float64(q, b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.numpy(), _faiss_flat(q, b), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_random_data_equals_exact_search(precision: str) -> None:
    b = _clustered(3000, 32, 20, seed=0)
    _check(_clustered(1500, 32, 20, seed=1), b, precision)
    _check(torch.randn(500, 32) * 3, b, precision)  # queries far from the bank


@pytest.mark.parametrize("precision", PRECISIONS)
def test_far_from_origin_equals_exact_search(precision: str) -> None:
    # an offset of 1000 makes the uncentred expansion |q|² + |b|² - 2q·b useless in fp32
    b = _clustered(2000, 16, 10, seed=2, offset=1000.0)
    _check(_clustered(800, 16, 10, seed=3, offset=1000.0), b, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ties_and_duplicated_rows_equal_exact_search(precision: str) -> None:
    g = torch.Generator().manual_seed(4)
    base = torch.randn(500, 16, generator=g)
    b = base.repeat(4, 1)  # every row four times
    mid = (base[:200] + base[200:400]) / 2  # queries halfway between two bank points
    q = torch.cat([b[:300], mid, torch.randn(300, 16, generator=g)])
    _check(q, b, precision)
    # the points themselves are at distance exactly 0
    assert _searcher(b, precision).search(b[:300]).abs().max() == 0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_encoder_embeddings_equal_exact_search(precision: str) -> None:
    from mspray.config import MSPrayConfig
    from mspray.model.multiscale import MultiScaleEncoder

    cfg = MSPrayConfig().replace(**{"model.image_size": 64, "model.pretrained": False})
    torch.manual_seed(0)
    model = MultiScaleEncoder(cfg).eval()
    g = torch.Generator().manual_seed(5)
    images = torch.rand(6, 3, 64, 64, generator=g)
    images[3:] = images[:3] + 0.02 * torch.rand(3, 3, 64, 64, generator=g)  # near-duplicates
    with torch.inference_mode():
        grid = model.embed(images, 16, 4)
    emb = grid.reshape(-1, grid.shape[-1]).float().contiguous()
    half = len(emb) // 2
    _check(emb[half:], emb[:half], precision)


def test_small_banks_and_empty_queries() -> None:
    b = torch.randn(3, 8)
    _check(torch.randn(50, 8), b, "fp32")  # fewer rows than candidates: all measured
    _check(torch.randn(50, 8), b[:1], "bf16")
    _check(torch.randn(50, 8), b, "cells")  # too few rows for cells: the dense search
    assert TorchSearch(b).search(torch.zeros(0, 8)).shape == (0,)
    with pytest.raises(ValueError):
        TorchSearch(b).search(torch.zeros(4, 7))
    with pytest.raises(ValueError):
        TorchSearch(torch.zeros(0, 8))
    with pytest.raises(ValueError):
        TorchSearch(b, precision="int8")


def _spy_exhaustive(monkeypatch: pytest.MonkeyPatch, searcher: TorchSearch) -> list[int]:
    """The sizes of the query sets ``searcher`` sends to its exhaustive fp32 pass."""
    calls: list[int] = []
    real = searcher._exhaustive
    monkeypatch.setattr(searcher, "_exhaustive", lambda q, *a: calls.append(len(q)) or real(q, *a))
    return calls


def test_unsure_rows_are_searched_again_and_the_bound_matters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    b = _clustered(4000, 32, 40, seed=6)
    q = _clustered(2000, 32, 40, seed=7)
    exact = _direct_fp32(q, b)
    # One bf16 candidate: the error bound sends the rows it cannot decide to the fp32 pass.
    searcher = TorchSearch(b, precision="bf16", candidates=1)
    calls = _spy_exhaustive(monkeypatch, searcher)
    assert torch.equal(searcher.search(q), exact)
    assert sum(calls) > 0
    # Without the bound (every pre-selection trusted) the bf16 ranking errors show.
    monkeypatch.setattr(TorchSearch, "_bound", lambda self, qn, v, dt: torch.full_like(qn, -1e30))
    wrong = TorchSearch(b, precision="bf16", candidates=1).search(q)
    assert not torch.equal(wrong, exact)


def test_groups_not_taken_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    # Groups of one row and two groups taken: the nearest's group is often not among them,
    # and the group test must catch it.
    monkeypatch.setattr(search_mod, "_GROUP", 1)
    b = _clustered(2000, 16, 4, seed=8)
    q = _clustered(500, 16, 4, seed=9)
    assert torch.equal(TorchSearch(b, precision="bf16", candidates=2).search(q), _direct_fp32(q, b))


def test_auto_search_precision_follows_the_device() -> None:
    from mspray.detector import cpu_has_native_bf16, resolve_search_precision

    cpu = torch.device("cpu")
    assert resolve_search_precision("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_search_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError):
        resolve_search_precision("fp16", cpu)


def test_half_precision_scores_stay_non_negative_for_integer_ordering() -> None:
    # Queries on bank points: true distances 0, rounding pushes raw scores below zero, where
    # int16 keys would order backwards without the offset.
    g = torch.Generator().manual_seed(10)
    b = torch.randn(3000, 16, generator=g) * 3
    q = b[torch.randperm(3000, generator=g)[:1000]] + 1e-4 * torch.randn(1000, 16, generator=g)
    _check(q, b, "bf16", candidates=2)


def test_cells_score_a_small_part_of_the_bank_and_their_bounds_matter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    b = _clustered(6000, 32, 60, seed=10)
    q = _clustered(3000, 32, 60, seed=11)
    exact = _direct_fp32(q, b)
    searcher = CellSearch(b, cell_rows=64)
    assert torch.equal(searcher.search(q), exact)
    assert searcher.scored_fraction < 0.3
    # Cells whose radius is taken as 0 are skipped wrongly: the nearest row is missed.
    monkeypatch.setattr(searcher, "_cell_radius", torch.zeros_like(searcher._cell_radius))
    monkeypatch.setattr(searcher, "_centre_gap", torch.full_like(searcher._centre_gap, 1e30))
    assert not torch.equal(searcher.search(q), exact)


def test_cells_send_near_ties_to_the_exhaustive_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(12)
    base = torch.randn(800, 16, generator=g)
    b = torch.cat([base, base + 1e-7 * torch.randn(800, 16, generator=g)])  # near-duplicates
    q = base[:400] + 0.05 * torch.randn(400, 16, generator=g)
    searcher = CellSearch(b, cell_rows=32)
    calls = _spy_exhaustive(monkeypatch, searcher)
    assert torch.equal(searcher.search(q), _direct_fp32(q, b))
    assert sum(calls) > 0


def test_auto_search_cells_follow_the_device() -> None:
    from mspray.detector import resolve_search_cells

    assert resolve_search_cells("auto", torch.device("cpu"))
    assert not resolve_search_cells("auto", torch.device("cuda"))
    assert not resolve_search_cells("off", torch.device("cpu"))
    assert resolve_search_cells("on", torch.device("cuda"))
    with pytest.raises(ValueError):
        resolve_search_cells("yes", torch.device("cpu"))
