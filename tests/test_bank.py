"""Tests for mspray.bank: exact/IVF search, greedy coreset, append, serialisation, GPU."""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np
import pytest
import torch

import mspray.bank as bank_mod
from mspray.bank import PatchBank, greedy_coreset
from mspray.config import BankConfig


def _cfg(**kw: object) -> BankConfig:
    """Defaults for tests: keep every vector unless a test asks for a coreset."""
    return BankConfig(coreset_ratio=1.0).replace(**kw)


def _clustered(n: int, d: int, k: int, seed: int, spread: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)).astype(np.float32) * 4
    labels = rng.integers(0, k, size=n)
    pts = centers[labels] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return pts.astype(np.float32)


def _min_dist_ref(q: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Brute-force reference in float64."""
    return torch.cdist(torch.from_numpy(q).double(), torch.from_numpy(b).double()).min(1)[0].numpy()


# ---------------------------------------------------------------------- search
def test_flat_search_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    b = rng.standard_normal((3000, 32)).astype(np.float32)
    q = rng.standard_normal((700, 32)).astype(np.float32)
    bank = PatchBank.build(b, _cfg())
    assert bank.ntotal == 3000 and bank.dim == 32 and not bank.on_gpu
    got = bank.search(q)
    assert got.dtype == np.float32 and got.shape == (700,)
    np.testing.assert_allclose(got, _min_dist_ref(q, b), rtol=1e-4)


def test_search_accepts_tensors_and_bank_points_are_at_zero() -> None:
    rng = np.random.default_rng(1)
    b = torch.from_numpy(rng.standard_normal((500, 16)).astype(np.float32))
    bank = PatchBank.build(b, _cfg())
    d = bank.search(b[:50].double())  # dtype converted, distance to itself ~ 0
    assert np.all(d >= 0) and d.max() < 1e-2
    assert bank.search(np.zeros((0, 16), np.float32)).shape == (0,)


def test_chunked_search_equals_unchunked() -> None:
    rng = np.random.default_rng(2)
    b = rng.standard_normal((2000, 24)).astype(np.float32)
    q = rng.standard_normal((1001, 24)).astype(np.float32)
    whole = PatchBank.build(b, _cfg(search_chunk=100_000)).search(q)
    chunked = PatchBank.build(b, _cfg(search_chunk=97)).search(q)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def test_dimension_mismatch_raises() -> None:
    bank = PatchBank.build(np.zeros((10, 8), np.float32), _cfg())
    with pytest.raises(ValueError, match="dimension 8"):
        bank.search(np.zeros((3, 9), np.float32))
    with pytest.raises(ValueError, match="N×D"):
        bank.search(np.zeros(8, np.float32))


# ---------------------------------------------------------------------- coreset
def test_greedy_coreset_is_farthest_first() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    sel = greedy_coreset(torch.from_numpy(x), 40, seed=5).numpy()
    assert sel.dtype == np.int64 and len(sel) == 40 and len(set(sel.tolist())) == 40
    dist = torch.cdist(torch.from_numpy(x).double(), torch.from_numpy(x).double()).numpy()
    for k in range(1, len(sel)):
        to_set = dist[:, sel[:k]].min(1)  # distance of every point to the first k picks
        assert to_set[sel[k]] >= to_set.max() * (1 - 1e-5), f"pick {k} is not the farthest"


def test_greedy_coreset_deterministic_and_clipped() -> None:
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    a = greedy_coreset(x, 20, seed=1)
    assert torch.equal(a, greedy_coreset(x, 20, seed=1))
    assert not torch.equal(a, greedy_coreset(x, 20, seed=2))  # different start point
    assert sorted(greedy_coreset(x, 500).tolist()) == list(range(200))
    assert greedy_coreset(x, 0).numel() == 0


def test_greedy_coreset_distinct_on_duplicated_data() -> None:
    x = torch.zeros(50, 4)
    x[:5] = torch.eye(4, 4)[torch.tensor([0, 1, 2, 3, 0])]
    sel = greedy_coreset(x, 30).tolist()
    assert len(set(sel)) == 30


def _radius(x: np.ndarray, idx: np.ndarray) -> float:
    """Coverage radius: the largest distance of any point to its nearest selected point."""
    return float(_min_dist_ref(x, x[idx]).max())


def test_coreset_covers_better_than_random() -> None:
    rng = np.random.default_rng(4)
    # One big blob plus 30 small far-away clusters: a random subset misses most of them.
    big = rng.standard_normal((1900, 16)).astype(np.float32)
    small_c = rng.standard_normal((30, 16)).astype(np.float32) * 10
    small = np.repeat(small_c, 4, axis=0) + 0.1 * rng.standard_normal((120, 16)).astype(np.float32)
    x = np.concatenate([big, small])
    m = 60
    core = greedy_coreset(torch.from_numpy(x), m, seed=0).numpy()
    rand = rng.choice(len(x), size=m, replace=False)
    assert _radius(x, core) < 0.5 * _radius(x, rand)


def _manifold(n: int, d: int, seed: int) -> torch.Tensor:
    """Points near a smooth 3-D manifold in d dimensions (like patch embeddings)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, 3, generator=g) * 6
    lift = torch.randn(3, d, generator=g)
    return torch.sin(z @ lift) + 0.01 * torch.randn(n, d, generator=g)


def _cell_stats(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counters of the cell-pruned greedy runs that follow (picks done with cells, cells
    skipped over those picks, rows measured, cells), filled in by the real function. Also
    lifts the size below which the default runs the plain loop, so small data uses cells."""
    monkeypatch.setattr(bank_mod, "_CELLS_MIN_SIZE", 0)
    stats: dict[str, int] = {}
    real = bank_mod._greedy_cells
    monkeypatch.setattr(bank_mod, "_greedy_cells", lambda *a, **k: real(*a, stats=stats, **k))
    return stats


def _farthest_first_shortfall(
    x: torch.Tensor, sel: torch.Tensor, init: torch.Tensor | None
) -> float:
    """Largest relative amount by which a pick is nearer to the earlier picks (and the
    ``init`` set) than the farthest point is, in float64: 0 for exact farthest-first."""
    x64 = x.double().numpy()  # numpy: 800 small single-threaded steps
    near = np.sqrt(init.double().numpy()) if init is not None else np.full(len(x), np.inf)
    worst = 0.0
    for s in sel.tolist():
        far = near.max()
        if np.isfinite(far) and far > 0:
            worst = max(worst, (far - near[s]) / far)
        np.minimum(near, np.linalg.norm(x64 - x64[s], axis=1), out=near)
    return float(worst)


@pytest.mark.parametrize("with_init", [False, True])
def test_cell_pruned_greedy_picks_equal_plain_greedy(
    with_init: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = _manifold(4000, 16, seed=6)
    init = None
    if with_init:  # extend an existing set: points start with their distance to it
        init = torch.cdist(x, x[:50]).min(1).values.square()
    stats = _cell_stats(monkeypatch)
    plain = greedy_coreset(x, 800, seed=2, prune=False, init_dist=init)
    assert not stats  # prune=False never reaches the cell loop
    cells = greedy_coreset(x, 800, seed=2, init_dist=init)
    assert torch.equal(plain, cells)
    # The data exercises the pruning: most picks run on cells and skip a third of them.
    assert stats["cell_picks"] > 400
    assert stats["cells_skipped"] > 0.3 * stats["cell_picks"] * stats["cells"]
    assert stats["rows"] < 0.3 * stats["cell_picks"] * len(x)


def test_cell_pruning_with_a_wrong_bound_changes_the_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    # The equality above is not vacuous: bounds 20 % too tight skip updates that matter.
    x = _manifold(4000, 16, seed=6)
    plain = greedy_coreset(x, 800, seed=2, prune=False)
    stats = _cell_stats(monkeypatch)
    monkeypatch.setattr(bank_mod, "_CELL_SLACK", -0.2)
    assert not torch.equal(plain, greedy_coreset(x, 800, seed=2))
    assert stats["cell_picks"] > 400


def test_default_runs_the_plain_loop_on_small_data(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = bank_mod._greedy_cells
    monkeypatch.setattr(bank_mod, "_greedy_cells", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _manifold(4000, 16, seed=6)  # 64k values: in cache, the plain loop is faster
    assert torch.equal(greedy_coreset(x, 800, seed=2), greedy_coreset(x, 800, prune=False, seed=2))
    assert not calls
    greedy_coreset(_manifold(16384, 64, seed=6), 200, seed=2)  # 2^20 values
    assert calls


@pytest.mark.parametrize("with_init", [False, True])
def test_cell_pruned_greedy_is_farthest_first(
    with_init: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Clustered data far from the origin: the plain loop's ||x||² - 2x·c + ||c||² rounds to
    # ~1e-5 of the distances here, so its picks are compared with float64 instead.
    x = torch.from_numpy(_clustered(4000, 16, 40, seed=3))
    init = torch.cdist(x, x[:50]).min(1).values.square() if with_init else None
    stats = _cell_stats(monkeypatch)
    sel = greedy_coreset(x, 800, seed=2, init_dist=init)
    assert stats["cell_picks"] > 400 and len(set(sel.tolist())) == 800
    assert _farthest_first_shortfall(x, sel, init) < 1e-4
    monkeypatch.setattr(bank_mod, "_CELL_SLACK", -0.2)  # a wrong bound is caught
    assert _farthest_first_shortfall(x, greedy_coreset(x, 800, seed=2, init_dist=init), init) > 1e-2


def test_cell_pruned_greedy_distinct_on_duplicated_data(monkeypatch: pytest.MonkeyPatch) -> None:
    # 100 distinct points, each 20 times: most picks are at distance 0 and cells can be empty.
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(7)).repeat(20, 1)
    stats = _cell_stats(monkeypatch)
    sel = greedy_coreset(x, 1500, seed=0)
    assert stats["cell_picks"] > 0
    assert len(set(sel.tolist())) == 1500
    assert len(set(sel[:100].remainder(100).tolist())) == 100  # every point before a repeat


def test_cell_pruned_greedy_deterministic_and_clipped(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _manifold(1000, 8, seed=8)
    stats = _cell_stats(monkeypatch)
    a = greedy_coreset(x, 300, seed=1)
    assert stats["cell_picks"] > 0
    assert a.dtype == torch.long and torch.equal(a, greedy_coreset(x, 300, seed=1))
    assert not torch.equal(a, greedy_coreset(x, 300, seed=2))
    assert sorted(greedy_coreset(x, 5000, seed=1).tolist()) == list(range(1000))


def test_coreset_with_projection() -> None:
    x = torch.from_numpy(_clustered(1000, 128, 20, seed=5))
    sel = greedy_coreset(x, 50, seed=0, proj_dim=16)
    assert len(set(sel.tolist())) == 50
    # Clusters are ~50 apart and ~5 wide: every cluster gets a pick, nearly as well as
    # without projection.
    exact = _radius(x.numpy(), greedy_coreset(x, 50, seed=0).numpy())
    assert _radius(x.numpy(), sel.numpy()) < 1.5 * exact < 10.0


def test_build_with_ratio_keeps_ceil_ratio_n_input_rows() -> None:
    x = _clustered(1234, 16, 10, seed=6)
    bank = PatchBank.build(x, _cfg(coreset_ratio=0.1))
    assert bank.ntotal == math.ceil(0.1 * 1234)
    # every kept vector is an input row
    assert _min_dist_ref(bank.vectors(), x).max() < 1e-6


def test_build_caps_coreset_by_candidates() -> None:
    x = _clustered(1000, 8, 5, seed=7)
    bank = PatchBank.build(x, _cfg(coreset_ratio=0.2, coreset_max_candidates=120))
    assert bank.ntotal == 120


def test_build_caps_coreset_size() -> None:
    x = _clustered(1000, 8, 5, seed=8)
    assert PatchBank.build(x, _cfg(coreset_ratio=0.5, coreset_max_size=37)).ntotal == 37
    assert PatchBank.build(x, _cfg(coreset_ratio=1.0, coreset_max_size=37)).ntotal == 1000


# ---------------------------------------------------------------------- IVF
def test_ivf_approximates_flat() -> None:
    x = _clustered(6000, 16, 30, seed=8)
    q = _clustered(1000, 16, 30, seed=8)[:1000] + 0.05
    flat = PatchBank.build(x, _cfg()).search(q)
    ivf_bank = PatchBank.build(x, _cfg(index="ivf", ivf_nlist=1024, ivf_nprobe=8))
    assert isinstance(ivf_bank.index, faiss.IndexIVFFlat)
    assert ivf_bank.index.nlist == 6000 // 39  # clipped for a small bank
    approx = ivf_bank.search(q)
    assert np.all(approx >= flat - 1e-4)  # approximate search never finds a closer point
    recall = np.mean(np.isclose(approx, flat, rtol=1e-4, atol=1e-4))
    assert recall > 0.9
    assert np.median(approx / np.maximum(flat, 1e-6)) < 1.01


# ---------------------------------------------------------------------- add
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_add_then_added_points_are_found(kind: str) -> None:
    x = _clustered(2000, 16, 10, seed=9)
    bank = PatchBank.build(x, _cfg(index=kind))
    new = _clustered(50, 16, 3, seed=99) + 20.0  # far from the bank
    assert bank.search(new).min() > 1.0
    assert bank.add(torch.from_numpy(new)) == 50
    assert bank.ntotal == 2050
    assert bank.search(new).max() < 1e-2
    np.testing.assert_allclose(bank.vectors()[-50:], new, atol=1e-6)


def test_add_with_coreset_extends_coverage() -> None:
    x = _clustered(1000, 8, 5, seed=10)
    bank = PatchBank.build(x, _cfg())
    # Half the new rows duplicate the bank, half are new far-away points: an incremental
    # coreset spends its picks on the new ones.
    far = _clustered(50, 8, 5, seed=11) + 30.0
    new = np.concatenate([x[:50], far])
    assert bank.add(new, _cfg(coreset_ratio=0.1)) == 10
    added = bank.vectors()[-10:]
    assert _min_dist_ref(added, far).max() < 1e-6


# ---------------------------------------------------------------------- serialisation
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_bytes_round_trip(kind: str) -> None:
    x = _clustered(3000, 16, 10, seed=12)
    q = _clustered(300, 16, 10, seed=13)
    bank = PatchBank.build(x, _cfg(index=kind, ivf_nprobe=4))
    data = bank.to_bytes()
    assert isinstance(data, bytes)
    back = PatchBank.from_bytes(data, _cfg(index=kind, ivf_nprobe=4))
    assert back.ntotal == bank.ntotal and back.dim == bank.dim
    np.testing.assert_array_equal(back.search(q), bank.search(q))
    np.testing.assert_array_equal(back.vectors(), bank.vectors())


def test_from_bytes_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        PatchBank.from_bytes(b"definitely not a faiss index", _cfg())


def test_gpu_requested_without_gpu_falls_back_and_logs_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(bank_mod, "_gpu_available", lambda: False)
    monkeypatch.setattr(bank_mod, "_warned_no_gpu", False)
    x = np.random.default_rng(14).standard_normal((100, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="mspray.bank"):
        a = PatchBank.build(x, _cfg(use_gpu=True))
        PatchBank.from_bytes(a.to_bytes(), _cfg(use_gpu=True))
    assert not a.on_gpu
    assert sum("use_gpu" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="faiss has no GPU here")
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_matches_cpu(kind: str) -> None:
    x = _clustered(5000, 64, 20, seed=15)
    q = _clustered(2000, 64, 20, seed=16)
    cpu = PatchBank.build(x, _cfg(index=kind, ivf_nprobe=8))
    gpu = PatchBank.build(x, _cfg(index=kind, ivf_nprobe=8, use_gpu=True))
    assert gpu.on_gpu
    np.testing.assert_allclose(gpu.search(q), cpu.search(q), rtol=1e-3, atol=1e-3)
    back = PatchBank.from_bytes(gpu.to_bytes(), _cfg(index=kind, ivf_nprobe=8, use_gpu=True))
    assert back.on_gpu and back.ntotal == 5000
    np.testing.assert_allclose(back.search(q), gpu.search(q), rtol=1e-5, atol=1e-5)
    if torch.cuda.is_available():
        qt = torch.from_numpy(q).cuda()
        np.testing.assert_allclose(gpu.search(qt), gpu.search(q), rtol=1e-6)
        sel = greedy_coreset(torch.from_numpy(x).cuda(), 100, seed=0)
        ref = greedy_coreset(torch.from_numpy(x), 100, seed=0)
        # Same seed, same start; rounding may reorder near-ties, so compare as sets.
        assert sel.is_cuda and len(set(sel.tolist()) & set(ref.tolist())) >= 90


def test_greedy_coreset_leaves_the_thread_counts_as_they_were() -> None:
    """The cell loop runs faiss on one thread; torch may share faiss's OpenMP runtime, and
    must get its own thread count back (else the whole process stays single-threaded)."""
    import faiss

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.from_numpy(np.random.default_rng(0).random((20000, 64), dtype=np.float32))
        greedy_coreset(x, 200, seed=0)
        assert torch.get_num_threads() == 2 and faiss.omp_get_max_threads() == 2
    finally:
        torch.set_num_threads(before)
