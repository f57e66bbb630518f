"""Tests for mspray.bank.coreset: greedy farthest-first picks, plain and cell-pruned loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_bank import _clustered, _min_dist_ref  # pytest puts tests/ on sys.path

import mspray.bank.coreset as coreset_mod
from mspray.bank.coreset import greedy_coreset


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
    monkeypatch.setattr(coreset_mod, "_CELLS_MIN_SIZE", 0)
    stats: dict[str, int] = {}
    real = coreset_mod._greedy_cells
    monkeypatch.setattr(coreset_mod, "_greedy_cells", lambda *a, **k: real(*a, stats=stats, **k))
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
    # The same picks up to float ties: the same set, in the same order but where two
    # distances tie within float32 rounding (the kernels round differently on AVX2 and
    # AVX-512), and farthest-first throughout.
    assert set(plain.tolist()) == set(cells.tolist())
    assert int((plain != cells).sum()) <= 4
    assert _farthest_first_shortfall(x, cells, init) < 1e-6
    # The data exercises the pruning: most picks run on cells and skip a third of them.
    assert stats["cell_picks"] > 400
    assert stats["cells_skipped"] > 0.3 * stats["cell_picks"] * stats["cells"]
    assert stats["rows"] < 0.3 * stats["cell_picks"] * len(x)


def test_cell_pruning_with_a_wrong_bound_changes_the_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    # The equality above is not vacuous: bounds 20 % too tight skip updates that matter.
    x = _manifold(4000, 16, seed=6)
    plain = greedy_coreset(x, 800, seed=2, prune=False)
    stats = _cell_stats(monkeypatch)
    monkeypatch.setattr(coreset_mod, "_CELL_SLACK", -0.2)
    assert not torch.equal(plain, greedy_coreset(x, 800, seed=2))
    assert stats["cell_picks"] > 400


def test_default_runs_the_plain_loop_on_small_data(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = coreset_mod._greedy_cells
    monkeypatch.setattr(
        coreset_mod, "_greedy_cells", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
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
    monkeypatch.setattr(coreset_mod, "_CELL_SLACK", -0.2)  # a wrong bound is caught
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


def _farthest_first_f64(x: torch.Tensor, start: int, k: int) -> list[int]:
    """Farthest-first picks in float64 with direct distances, from ``start``."""
    x64 = x.double().numpy()
    near = np.full(len(x), np.inf)
    picks = [start]
    for _ in range(k - 1):
        np.minimum(near, np.linalg.norm(x64 - x64[picks[-1]], axis=1), out=near)
        near[picks] = -np.inf
        picks.append(int(near.argmax()))
    return picks


@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize(("offset", "spread"), [(10.0, 1e-3), (100.0, 1e-2)])
def test_near_duplicate_data_far_from_origin_equals_float64_farthest_first(
    prune: bool, offset: float, spread: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Near-duplicates far from the origin: uncentred, the float32 expansion's rounding
    # (~1e-7·|x|²) is larger than the distances themselves and the picks go wrong at once.
    monkeypatch.setattr(coreset_mod, "_CELLS_MIN_SIZE", 0)  # small data takes the cell loop
    x = offset + spread * _manifold(4000, 16, seed=9)
    sel = greedy_coreset(x, 800, seed=2, prune=prune).tolist()
    assert sel == _farthest_first_f64(x, sel[0], 800)
    # Not vacuous: the plain loop on the uncentred data misses already at the second pick.
    work = x.clone()
    min_dist = torch.full((len(x),), float("inf"))
    raw, _ = coreset_mod._greedy_plain(
        work, work.square().sum(1), min_dist, torch.tensor(sel[0]), 50
    )
    assert raw.tolist() != sel[:50]


@pytest.mark.parametrize("prune", [True, False])
def test_the_cover_gives_every_point_its_nearest_pick(
    prune: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the cover is what the fold banks derive from (mspray/decisions/fold_banks.py)
    stats = _cell_stats(monkeypatch)
    x = _manifold(4000, 16, seed=2)
    cover: dict[str, torch.Tensor] = {}
    picks = greedy_coreset(x, 400, seed=1, prune=prune, cover=cover)
    assert torch.equal(picks, greedy_coreset(x, 400, seed=1, prune=prune))  # same picks
    assert bool(stats.get("cell_picks")) == prune
    d = torch.cdist(x.double(), x[picks].double())
    assert (cover["nearest"] == d.argmin(1)).float().mean() > 0.999  # (float ties aside)
    torch.testing.assert_close(cover["sq_dist"].double(), d.amin(1).square(), atol=1e-4, rtol=0)
