"""Tests for mspray.threshold: quantile threshold from normal scores, normalisation stats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mspray.threshold import calibrate_threshold, score_stats


def test_quantile_of_normal_scores() -> None:
    scores = np.arange(101, dtype=float)  # quantile q is exactly 100*q
    assert calibrate_threshold(scores) == pytest.approx(99.0)
    assert calibrate_threshold(scores, quantile=0.5) == pytest.approx(50.0)
    assert calibrate_threshold(scores, quantile=1.0) == pytest.approx(100.0)
    # Order and container do not matter; torch tensors are accepted.
    shuffled = np.random.default_rng(0).permutation(scores)
    assert calibrate_threshold(torch.from_numpy(shuffled), 0.9) == pytest.approx(90.0)
    assert calibrate_threshold([[1.0, 2.0], [3.0, 4.0]], 1.0) == pytest.approx(4.0)


def test_margin_positive_and_negative_scores() -> None:
    scores = np.arange(101, dtype=float)
    assert calibrate_threshold(scores, 0.99, margin=1.1) == pytest.approx(108.9)
    assert calibrate_threshold(scores, 0.99, margin=0.5) == pytest.approx(49.5)
    # Negative quantile (z-scored maps): margin > 1 still moves the threshold up.
    neg = -scores  # 0.5 quantile is -50
    assert calibrate_threshold(neg, 0.5, margin=1.2) == pytest.approx(-40.0)
    assert calibrate_threshold(neg, 0.5, margin=1.0) == pytest.approx(-50.0)


def test_threshold_flags_about_the_expected_fraction() -> None:
    normal = np.random.default_rng(1).normal(size=10_000)
    t = calibrate_threshold(normal, 0.95)
    assert np.mean(normal > t) == pytest.approx(0.05, abs=1e-3)


def test_threshold_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        calibrate_threshold([])
    with pytest.raises(ValueError, match="NaN"):
        calibrate_threshold([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="quantile"):
        calibrate_threshold([1.0, 2.0], quantile=1.5)
    with pytest.raises(ValueError, match="margin"):
        calibrate_threshold([1.0, 2.0], margin=float("nan"))


def test_score_stats() -> None:
    values = np.random.default_rng(2).normal(3.0, 2.0, size=(10, 32, 32)).astype(np.float32)
    mean, std = score_stats(values.ravel())
    assert isinstance(mean, float) and isinstance(std, float)
    assert mean == pytest.approx(float(values.mean(dtype=np.float64)), rel=1e-9)
    assert std == pytest.approx(float(values.std(dtype=np.float64)), rel=1e-9)
    assert score_stats(torch.tensor([1.0, 3.0])) == (2.0, 1.0)
    assert score_stats([5.0, 5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError, match="empty"):
        score_stats(np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        score_stats(np.array([1.0, np.nan]))
