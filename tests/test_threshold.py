"""Tests for mspray.decisions.threshold: quantile threshold from normal scores, normalisation
stats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import beta, norm

from mspray.config import ScoreConfig
from mspray.decisions.threshold import (
    calibrate_threshold,
    min_calibration_images,
    order_statistic_threshold,
    score_stats,
    stats_from_moments,
    threshold_from_config,
    trimmed_threshold,
    value_moments,
)


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


# ---------------------------------------------------------------------------- order statistics
def test_order_statistic_rank_and_promise() -> None:
    scores = np.arange(1.0, 200.0)  # n = 199: X_(198) promises exactly 2/200 = 0.01
    cal = order_statistic_threshold(scores, target_fpr=0.01)
    assert (cal.n, cal.rank, cal.threshold) == (199, 198, 198.0)
    assert cal.promised_fpr == pytest.approx(0.01)
    lo, hi = cal.fpr_interval
    assert lo == pytest.approx(beta.ppf(0.025, 2, 198)) and hi == pytest.approx(
        beta.ppf(0.975, 2, 198)
    )
    assert cal.warning is None and cal.method == "order_statistic"
    # too few images for 1 %: the maximum, promising 1/(n+1) > target, with a warning
    small = order_statistic_threshold(np.arange(50.0), target_fpr=0.01)
    assert small.threshold == 49.0 and small.promised_fpr == pytest.approx(1 / 51)
    assert "99 normal images" in small.warning
    assert min_calibration_images(0.01) == 99


def test_promise_holds_on_simulated_normal_scores() -> None:
    # 2000 calibration sets of 150 normal scores; the true false-alarm rate of each
    # threshold is known (normal survival function): its mean is the promise and the
    # 95 % interval covers it ~95 % of the time.
    rng = np.random.default_rng(0)
    sets = rng.normal(size=(2000, 150))
    cals = [order_statistic_threshold(s, 0.02) for s in sets]
    true_fpr = norm.sf([c.threshold for c in cals])
    assert true_fpr.mean() == pytest.approx(cals[0].promised_fpr, rel=0.05)
    assert {c.fpr_interval for c in cals} == {cals[0].fpr_interval}  # depends on n, k only
    lo, hi = cals[0].fpr_interval
    assert np.mean((true_fpr >= lo) & (true_fpr <= hi)) == pytest.approx(0.95, abs=0.02)
    # the count interval for m new normal images covers the observed count ~>= 95 %
    m = 300
    flags = rng.binomial(m, true_fpr)
    lo, hi = cals[0].expected_flags(m)
    assert np.mean((flags >= lo) & (flags <= hi)) >= 0.94


def test_legacy_quantile_wins_when_set() -> None:
    scores = np.random.default_rng(3).normal(size=500)
    legacy = threshold_from_config(scores, ScoreConfig(threshold_quantile=0.9))
    assert legacy.method == "quantile" and legacy.target_fpr == pytest.approx(0.1)
    assert legacy.threshold == pytest.approx(calibrate_threshold(scores, 0.9))
    assert legacy.promised_fpr == pytest.approx(0.1, abs=0.01)
    new = threshold_from_config(scores, ScoreConfig(target_fpr=0.05))
    assert new.method == "order_statistic"
    assert new.threshold == order_statistic_threshold(scores, 0.05).threshold
    # a margin moves the threshold off the scores: the promise brackets both neighbours
    wide = threshold_from_config(scores, ScoreConfig(target_fpr=0.05, threshold_margin=1.01))
    assert wide.threshold > new.threshold and not wide.to_dict()["exact"]
    assert wide.fpr_interval[0] < wide.promised_fpr < wide.fpr_interval[1]


@pytest.mark.parametrize("anomalies", ["high", "low", "none"])
def test_trimmed_threshold_holds_whatever_the_anomalies_do(anomalies: str) -> None:
    # 1000 production scores, up to 5 % anomalous: the true false-alarm rate on normals is
    # inside the promised interval ~>= 95 % of the time however the anomalies score.
    rng = np.random.default_rng(1)
    inside = []
    for _ in range(250):
        n_anom = 0 if anomalies == "none" else 50
        normal = rng.normal(size=1000 - n_anom)
        shift = 10.0 if anomalies == "high" else -10.0
        cal = trimmed_threshold(np.r_[normal, rng.normal(shift, 1, n_anom)], 0.05, 0.01)
        inside.append(cal.fpr_interval[0] <= norm.sf(cal.threshold) <= cal.fpr_interval[1])
    assert np.mean(inside) >= 0.94
    assert cal.method == "trimmed" and cal.to_dict()["assumed_anomalies"] == 50


def test_order_statistic_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="target_fpr"):
        order_statistic_threshold([1.0, 2.0], target_fpr=0.0)
    with pytest.raises(ValueError, match="anomaly rate"):
        trimmed_threshold([1.0, 2.0], anomaly_rate=1.0)
    with pytest.raises(ValueError, match="empty"):
        order_statistic_threshold([])


def test_moments_add_up_over_any_split() -> None:
    values = np.random.default_rng(0).normal(3.0, 0.5, size=(7, 100))
    parts = np.stack([value_moments(v) for v in values])  # e.g. one row per image
    assert stats_from_moments(parts) == pytest.approx(score_stats(values.ravel()), rel=1e-12)
    assert stats_from_moments(parts) == pytest.approx((values.mean(), values.std()), rel=1e-12)
    with pytest.raises(ValueError):
        stats_from_moments(np.zeros((0, 3)))


def test_a_widened_promise_holds_when_suspect_scores_sat_too_low() -> None:
    from mspray.decisions.threshold import widen_promise

    rng = np.random.default_rng(0)
    n, suspect, trials = 200, 20, 100
    cal_rate, flags = [], []
    for _ in range(trials):
        scores = rng.normal(size=n)
        # a tenth of the calibration images had near-duplicates in their bank: too low
        scores[:suspect] -= 5.0
        cal = order_statistic_threshold(scores, 0.02, 0.95, source="crossfit")
        wide = widen_promise(cal, suspect, "test")
        new = rng.normal(size=400)  # new normal images score like the valid ones
        flags.append(int((new > cal.threshold).sum()))
        lo, hi = wide.expected_flags(400)
        cal_rate.append(lo <= flags[-1] <= hi)
        assert wide.fpr_interval[1] > cal.fpr_interval[1]
        assert wide.promised_fpr > cal.promised_fpr and "widened" in wide.to_dict()
    # the narrow promise understates the rate, the widened one covers it (~95 % of runs)
    assert cal.promised_fpr < np.mean(flags) / 400 <= wide.promised_fpr
    assert np.mean(cal_rate) >= 0.9
    assert widen_promise(cal, 0, "nothing") is cal
