"""Cross-calibration on overlapping crops keeps its promise; recalibration on production
images (library and ``mspray calibrate``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mspray.artifacts.bundle import load_bundle, read_meta, resolve_bundle
from mspray.cli import main
from mspray.config import tiny_config
from mspray.data.datasets import test_samples, train_paths
from mspray.data.images import load_images
from mspray.data.synthetic import make_strip_dataset
from mspray.decisions.calibration import fold_plan, recalibrate, score_images
from mspray.decisions.near_duplicates import GAP_RUNS, GAP_SAMPLE, gap_sample, near_duplicate_gap
from mspray.evaluation.evaluate import evaluate
from mspray.pipeline.steps import fit_detector
from mspray.storage import list_files

# untrained (random init) encoders: the decision, not the features, is under test
STRIP_CFG = {
    "train.epochs": 0,
    "train.val_fraction": 0.1,
    "bank.coreset_ratio": 1.0,  # exact banks: cheap to build five times
    "score.target_fpr": 0.03,
}


@pytest.fixture(scope="module")
def strip(tmp_path_factory) -> str:
    """Consecutive crops of one fabric strip, each overlapping the next 7 by 1/8 less each
    time (camera frames); test crops and a drifted production batch further along it."""
    root = tmp_path_factory.mktemp("strip")
    make_strip_dataset(str(root), n_train=80, n_test_good=60, n_test_defect=12, size=64, step=8)
    make_strip_dataset(
        str(root),
        "drift",
        n_train=80,
        n_test_good=60,
        n_test_defect=12,
        n_production=100,
        production_anomaly_rate=0.05,
        brightness=0.06,
        contrast=1.15,
        size=64,
        step=8,
    )
    return str(root)


def _fit(root: str, category: str, calibration: str):
    cfg = tiny_config(**STRIP_CFG, **{"score.calibration": calibration})
    return fit_detector(cfg, train_paths(f"mvtec:{root}", category))


def test_fold_plan_blocks_and_gaps() -> None:
    plan = fold_plan(10, folds=3, gap=1)
    scored = np.concatenate([s for s, _ in plan])
    assert scored.tolist() == list(range(10))  # contiguous blocks, every image once
    assert [s.tolist() for s, _ in plan] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [e.tolist() for _, e in plan] == [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [6, 7, 8, 9]]
    assert len(fold_plan(3, folds=5)) == 3  # never more folds than images
    with pytest.raises(ValueError, match="at least 2"):
        fold_plan(1, 5)


def test_crossfit_keeps_its_promise_on_overlapping_crops(strip: str) -> None:
    samples = test_samples(f"mvtec:{strip}", "strip")
    crossfit = evaluate(_fit(strip, "strip", "crossfit"), samples)
    cal, fa = crossfit["calibration"], crossfit["false_alarms"]
    assert cal["source"] == "crossfit" and cal["n"] == 80 and cal["method"] == "order_statistic"
    assert 3 <= cal["gap"] <= 7  # measured: a crop overlaps the next 7
    assert fa["n_normal"] == 60
    # the observed false alarms on the new normal crops are what the promise predicts
    lo, hi = fa["expected_flagged"]
    assert lo <= fa["flagged"] <= hi, fa
    assert fa["within_promise"]
    assert crossfit["at_threshold"]["true_positives"] >= 4  # of 12 defects: still useful
    # the held-out split has near-duplicates in the bank: its threshold breaks its promise
    holdout = evaluate(_fit(strip, "strip", "holdout"), samples)
    assert holdout["calibration"]["source"] == "holdout"
    assert not holdout["false_alarms"]["within_promise"]
    assert holdout["false_alarms"]["observed_fpr"] > holdout["calibration"]["fpr_interval"][1]


def test_recalibration_on_drifted_production_images(strip: str, tmp_path) -> None:
    det = _fit(strip, "drift", "crossfit")
    old_threshold, old_cal = det.threshold, dict(det.meta["calibration"])
    prod = list_files(f"{strip}/drift/production")
    scores = score_images(det, load_images(prod, 64))
    samples = test_samples(f"mvtec:{strip}", "drift")
    before = evaluate(det, samples)["false_alarms"]
    assert not before["within_promise"]  # brightness/contrast drift: far more false alarms

    cal = recalibrate(det, scores, expected_anomaly_rate=0.05)
    assert cal.method == "trimmed" and det.threshold == cal.threshold != old_threshold
    after = evaluate(det, samples)["false_alarms"]
    lo, hi = after["expected_flagged"]
    assert lo <= after["flagged"] <= hi, after
    check = det.meta["calibration"]["production_check"]
    assert check["n_images"] == 100 and check["previous_threshold"] == old_threshold
    assert check["flagged"] == int((scores > old_threshold).sum())
    assert check["previous_promised_fpr"] == old_cal["promised_fpr"]
    assert det.meta["calibration_history"][-1] == old_cal

    with pytest.raises(ValueError, match="exactly one"):
        recalibrate(det, scores, normal=False)  # neither all-normal nor an anomaly rate
    # all-normal batch: the previous promise is checked on the batch's flag count
    normal_scores = scores[scores <= np.quantile(scores, 0.9)]
    recalibrate(det, normal_scores, normal=True)
    assert "previous_promise_held" in det.meta["calibration"]["production_check"]


def test_calibrate_cli_writes_a_new_bundle_version(strip: str, tmp_path, capsys) -> None:
    bundle = str(tmp_path / "b")
    cfg = tiny_config(**STRIP_CFG, **{"score.calibration": "holdout"})
    fit_detector(cfg, train_paths(f"mvtec:{strip}", "drift"), out=bundle)
    old = resolve_bundle(bundle)
    before = read_meta(old)
    prod = f"{strip}/drift/production"
    argv = ["-q", "calibrate", "--bundle", bundle, "--input", prod, "--normal"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    # a new version under the same root, which `latest` now names
    assert resolve_bundle(bundle) == printed["bundle"] != old
    new = load_bundle(bundle, with_banks=False)
    assert printed["version"] == new.version != before["version"]
    assert new.meta["calibration"]["source"] == "production"
    assert new.meta["calibration"]["production_check"]["n_images"] == 100
    assert new.meta["recalibrated_from"] == {"bundle": old, "version": before["version"]}
    assert read_meta(old) == before  # the version it came from is untouched
    # exactly one of --normal / -R
    with pytest.raises(SystemExit):
        main(["calibrate", "--bundle", bundle, "--input", prod])


def _strip_embeddings(n: int, patches: int = 20, shift: int = 5, dim: int = 8) -> torch.Tensor:
    """Image i holds patches i·shift .. i·shift + patches - 1 of one long random strip (plus
    noise): images up to patches/shift - 1 apart share whole patches."""
    gen = torch.Generator().manual_seed(0)
    strip = torch.randn(n * shift + patches, dim, generator=gen)
    idx = torch.arange(n)[:, None] * shift + torch.arange(patches)[None, :]
    return strip[idx] + 1e-3 * torch.randn(n, patches, dim, generator=gen)


@pytest.mark.parametrize("n", [120, 1000])
def test_near_duplicate_gap_on_all_or_a_bounded_sample(n: int) -> None:
    sample = gap_sample(n)
    assert len(sample) == min(n, GAP_SAMPLE) and len(np.unique(sample)) == len(sample)
    if n > GAP_SAMPLE:  # runs of consecutive images, each with a partner run half-way on
        runs = sample.reshape(GAP_RUNS, -1)
        assert (np.diff(runs, axis=1) == 1).all()
        half = (GAP_RUNS // 2) * (n // GAP_RUNS)
        assert set((runs[0] + half) % n) <= set(sample)
    emb = _strip_embeddings(n)
    # images share whole patches with the next 3 (20 patches shifted by 5 per image)
    assert near_duplicate_gap(emb[torch.from_numpy(sample)], sample, n) == 3
    independent = torch.randn(len(sample), 20, 8, generator=torch.Generator().manual_seed(1))
    assert near_duplicate_gap(independent, sample, n) == 0


def test_overlapping_tiles_in_random_name_order_keep_the_false_alarm_promise(tmp_path) -> None:
    # tiles of one gravel photo overlap by 3/4 and are named in random order: name order
    # shows no near-duplicates (gap 0), their content does
    from mspray.data.tiles import make_tile_dataset

    make_tile_dataset(str(tmp_path), "tiles", size=64, grid=4, n_test_good=30, n_test_defect=15)
    spec = f"mvtec:{tmp_path}"
    det = fit_detector(tiny_config(**{"train.epochs": 0}), train_paths(spec, "tiles"), False)
    cal = det.meta["calibration"]
    assert cal["source"] == "crossfit" and cal["n"] == 169
    assert cal["gap"] == 0 and cal["fold_order"] == "content"
    assert cal["near_duplicate_pairs"] >= 169  # each tile has several overlapping ones
    fa = evaluate(det, test_samples(spec, "tiles"))["false_alarms"]
    assert fa["n_normal"] == 30 and fa["within_promise"], fa


def test_a_fallback_to_held_out_calibration_is_never_silent(strip: str) -> None:
    # a name-order gap wider than the set empties every fold bank: cross-calibration is not
    # possible, and the held-out calibration that replaces it says so in meta.json
    cfg = tiny_config(**{**STRIP_CFG, "score.calibration_gap": 200, "train.val_fraction": 0.2})
    det = fit_detector(cfg, train_paths(f"mvtec:{strip}", "strip"))
    cal = det.meta["calibration"]
    assert cal["source"] == "holdout" and "fallback" in cal
    assert "fold bank would be empty" in cal["fallback"]
    assert cal["fallback"] in cal["warning"]  # and in the train summary line
    assert "suspect_share" in cal  # held-out images with near-duplicates in the bank


def _tile_embeddings(n: int, side: int = 6, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """``n`` overlapping 6x6-cell tiles of one smooth random field in random name order."""
    g = torch.Generator().manual_seed(seed)
    grid = math.isqrt(n) + 1
    field = torch.randn(dim, 2 * grid + side + 2, 2 * grid + side + 2, generator=g)
    field = torch.nn.functional.avg_pool2d(field[None], 3, 1)[0].permute(1, 2, 0)
    corners = [(2 * (k // grid), 2 * (k % grid)) for k in range(n)]
    order = torch.randperm(n, generator=g).tolist()
    tiles = [field[y : y + side, x : x + side].reshape(-1, dim) for y, x in corners]
    emb = torch.stack([tiles[i] for i in order])
    return emb + 0.02 * torch.randn(emb.shape, generator=g)


def test_near_duplicates_beyond_the_sample_widen_the_promise() -> None:
    # 700 overlapping tiles in random name order: more than the content check compares, so
    # they cannot all be kept out of the fold banks; the share that may not is estimated
    # from the sample, and the promise widened by it
    from types import SimpleNamespace

    from mspray.decisions.calibration import plan_folds, widen_for_suspects
    from mspray.decisions.threshold import order_statistic_threshold

    n = 700
    emb = _tile_embeddings(n)
    cfg = tiny_config(**{"score.calibration_gap": 0})
    det = SimpleNamespace(cfg=cfg, scales=(32, 16), bank_stride=lambda s: 4, meta={})

    def embed(positions: np.ndarray, scale: int) -> np.ndarray:
        return emb[torch.from_numpy(positions)].reshape(-1, emb.shape[-1]).numpy()

    plan, info = plan_folds(det, n, embed)
    assert info["near_duplicates_sampled"] == GAP_SAMPLE and info["fold_order"] == "names"
    assert 0.1 < info["suspect_share"] <= 1.0
    cal = order_statistic_threshold(np.random.default_rng(0).normal(size=n), 0.01)
    wide = widen_for_suspects(det, cal, info)
    assert wide.fpr_interval[1] > cal.fpr_interval[1] and "widened" in det.meta["calibration"]


def test_fold_banks_derive_from_one_greedy_run_and_cover_like_fresh_ones() -> None:
    from types import SimpleNamespace

    from mspray.bank import PatchBank
    from mspray.decisions.fold_banks import fold_banks

    n, p = 30, 36
    emb = _tile_embeddings(n).numpy().reshape(n * p, -1)
    owner = np.repeat(np.arange(n), p)
    cfg = tiny_config(**{"bank.coreset_ratio": 0.2})
    det = SimpleNamespace(cfg=cfg, scales=(32,))
    plan = fold_plan(n, 5, gap=2)
    timings: dict = {}
    for (scored, excluded), (scored2, banks) in zip(
        plan,
        fold_banks(det, plan, np.ones(n, bool), {32: (emb, owner)}, None, timings),
        strict=True,
    ):
        assert np.array_equal(scored, scored2)
        keep = ~np.isin(owner, excluded)
        fresh = PatchBank.build(emb[keep], cfg.bank, seed=0)
        assert banks[32].ntotal == fresh.ntotal  # the fold's own target size
        vec = banks[32].vectors()
        # no excluded image's row is in the fold bank
        assert (
            PatchBank.build(vec, cfg.bank.replace(coreset_ratio=1.0)).search(emb[~keep]).min() > 0
        )
        q = np.isin(owner, scored)
        derived_d, fresh_d = banks[32].search(emb[q]).mean(), fresh.search(emb[q]).mean()
        assert abs(derived_d / fresh_d - 1) < 0.1
    assert timings["fold_coreset_shared_s"] > 0 and timings["fold_banks_s"] > 0


def test_a_fold_bank_picks_among_the_shared_picks_and_its_orphans_only() -> None:
    # A fold's greedy continuation does not run over all its rows: its candidates are the
    # shared run's usable picks and the fold's orphans (rows whose nearest shared pick lies
    # in an excluded image); every other row is within the shared run's radius of a pick.
    from mspray.bank import PatchBank
    from mspray.decisions.fold_banks import fold_rows, shared_run

    n, p = 30, 36
    emb = _tile_embeddings(n).numpy().reshape(n * p, -1)
    owner = np.repeat(np.arange(n), p)
    cfg = tiny_config(**{"bank.coreset_ratio": 0.2}).bank
    run = shared_run(emb, cfg, seed=0)
    bank = PatchBank.build(emb, cfg, seed=0)  # the bank's own coreset: the same picks
    assert np.array_equal(np.sort(run.picks), np.flatnonzero(bank.search(emb) == 0))
    nearest = torch.cdist(torch.from_numpy(emb), torch.from_numpy(emb[run.picks])).argmin(1)
    assert (run.nearest == nearest.numpy()).mean() > 0.99  # (float ties aside)
    for excluded in (np.arange(3, 9), np.arange(0, 14, 2)):
        keep = ~np.isin(owner, excluded)
        usable = keep[run.picks]
        orphans = run.candidates[keep[run.candidates] & ~usable[run.nearest]]
        rows = fold_rows(emb, keep, cfg, 0, run)
        assert len(rows) == PatchBank.build(emb[keep], cfg, seed=0).ntotal  # its own target
        assert keep[rows].all()
        assert np.isin(rows, np.concatenate([run.picks[usable], orphans])).all()
        assert len(orphans) < 0.5 * keep.sum()  # a bounded set, not all of the fold's rows
