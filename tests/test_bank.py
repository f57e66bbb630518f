"""Tests for mspray.bank: exact/IVF search, coreset-reduced builds, append, serialisation, GPU."""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np
import pytest
import torch

import mspray.bank as bank_mod
from mspray.bank import PatchBank
from mspray.bank.coreset import greedy_coreset
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
