"""Bank building on Ray Data: from S3 equals the core's banks, two-level coreset sizes, and
appending new normal images without retraining."""

from __future__ import annotations

import contextlib
import math
import os
import shutil

import numpy as np
import pytest

from mspray import storage
from mspray.artifacts.bundle import load_bundle, save_bundle
from mspray.bank import global_bank_config, shard_keep_ratio
from mspray.config import BankConfig, PoolConfig
from mspray.data.datasets import train_paths
from mspray.data.images import load_images
from mspray.data.synthetic import make_synthetic_dataset
from mspray.decisions.calibration import calibrate_normal_images
from mspray.decisions.summaries import calibrate
from mspray.pipeline.steps import build_banks, split_holdout
from mspray.ray.executor import RayExecutor


def test_two_level_coreset_ratios():
    cfg = BankConfig(coreset_ratio=0.1, coreset_max_candidates=1000)
    assert shard_keep_ratio(cfg, 800) == 1.0  # fits the budget: one global coreset
    assert shard_keep_ratio(cfg, 5000) == pytest.approx(0.2)  # union of shards fits it
    # the driver never holds more than the candidate budget, however large the image set
    assert shard_keep_ratio(cfg, 10**6) * 10**6 == pytest.approx(1000)
    assert shard_keep_ratio(BankConfig(coreset_ratio=1.0, coreset_max_candidates=10), 99) == 1
    # global step keeps ceil(0.1 * 5000) = 500 of the 1000 shard-reduced rows
    g = global_bank_config(cfg, total_rows=5000, union_rows=1000)
    assert math.ceil(g.coreset_ratio * 1000) == 500
    assert global_bank_config(cfg, 800, 800) is cfg


def _driver_must_not_load(*args, **kwargs):
    raise AssertionError("the driver loaded images: calibration must run on the actor pool")


@contextlib.contextmanager
def _no_image_loading_on_the_driver(monkeypatch):
    """Image loading raises in this (driver) process; Ray's actors are other processes."""
    import mspray.data.images as images

    with monkeypatch.context() as m:
        for name in ("load_images", "load_image", "decode_image"):
            m.setattr(images, name, _driver_must_not_load)
        yield


@pytest.mark.ray
def test_bank_build_from_s3_equals_core_banks(ray_local, tiny_bundle, s3_bucket, monkeypatch):
    local_bundle, _ = tiny_bundle
    data = f"{s3_bucket}/datasets"
    make_synthetic_dataset(data, n_train=10, n_test_good=1, n_test_defect=1, size=64, seed=3)
    bundle = f"{s3_bucket}/models/tiny"
    save_bundle(load_bundle(local_bundle), bundle)
    uris = train_paths(f"mvtec:{data}", "synthetic")
    out = f"{s3_bucket}/models/rebuilt"
    with _no_image_loading_on_the_driver(monkeypatch):  # calibration reads on the actors
        result = build_banks(
            bundle,
            uris,
            RayExecutor(pool=PoolConfig(workers=2)),
            out=out,
            overrides={"bank.coreset_ratio": 1.0},
        )
    det = load_bundle(out)  # from S3
    assert det.version == result.version != load_bundle(bundle).version
    assert det.cfg.bank.coreset_ratio == 1.0
    # the core on the same split: same bank vectors in the same order, same threshold
    bank_uris, val_uris = split_holdout(uris, det.cfg.train.val_fraction, det.cfg.train.seed)
    ref = load_bundle(out, with_banks=False)
    ref.build_banks(load_images(bank_uris, 64))
    for s in det.scales:
        np.testing.assert_allclose(det.banks[s].vectors(), ref.banks[s].vectors(), atol=1e-5)
    # cross-calibration on the actor pool = the core's on the same images
    assert det.cfg.score.calibration == "crossfit"
    names = sorted(uris)
    calibrate_normal_images(ref, load_images(names, 64), np.isin(names, bank_uris))
    assert det.threshold == pytest.approx(ref.threshold, rel=1e-4)
    assert det.meta["calibration"]["source"] == "crossfit"
    assert det.meta["calibration"]["n"] == len(uris)
    assert result.n_images == len(bank_uris) and result.n_errors == 0
    assert det.meta["n_holdout_images"] == len(val_uris)


@pytest.mark.ray
def test_holdout_calibration_on_the_pool_equals_the_core(
    ray_local, tiny_bundle, tmp_path, monkeypatch
):
    bundle, spec = tiny_bundle
    uris = train_paths(spec, "synthetic")
    over = {"bank.coreset_ratio": 1.0, "score.calibration": "holdout"}
    with _no_image_loading_on_the_driver(monkeypatch):
        build_banks(
            bundle,
            uris,
            RayExecutor(pool=PoolConfig(workers=2)),
            out=str(tmp_path / "h"),
            overrides=over,
        )
    det = load_bundle(str(tmp_path / "h"))
    assert det.meta["calibration"]["source"] == "holdout"
    _, val_uris = split_holdout(uris, det.cfg.train.val_fraction, det.cfg.train.seed)
    ref = load_bundle(str(tmp_path / "h"))
    calibrate(ref, load_images(sorted(val_uris), 64))
    assert det.meta["calibration"]["n"] == len(val_uris) >= 2
    assert det.threshold == pytest.approx(ref.threshold, rel=1e-5)
    for s in det.scales:
        assert det.stats[s] == pytest.approx(ref.stats[s], rel=1e-5)


@pytest.mark.ray
def test_large_bank_is_reduced_per_shard_then_globally(ray_local, tiny_bundle, tmp_path, png_bytes):
    bundle, spec = tiny_bundle
    uris = train_paths(spec, "synthetic")
    bad = tmp_path / "bad.png"
    bad.write_bytes(png_bytes((40, 40))[:100])  # a truncated training image is skipped
    result = build_banks(
        bundle,
        uris + [str(bad)],
        RayExecutor(pool=PoolConfig(workers=2)),
        out=str(tmp_path / "b"),
        append=True,  # all images in the bank: easy to count patches
        # a tiny candidate budget forces the per-shard step
        overrides={"bank.coreset_ratio": 0.25, "bank.coreset_max_candidates": 300},
        calibrate=False,
    )
    assert result.n_errors == 1 and "bad.png" in result.errors[0]
    before = load_bundle(bundle)
    after = load_bundle(str(tmp_path / "b"))
    probe = load_images(uris[:1], 64)
    for s in before.scales:
        total = before.bank_embeddings(probe, s).shape[0] * len(uris)
        assert total > 300  # so the shards were reduced before the global coreset
        added = after.banks[s].ntotal - before.banks[s].ntotal
        # ceil(0.25 * total) patches, unless more than the candidate budget: the driver
        # never holds more than the budget (+ one row per shard from rounding up); the
        # append coreset then keeps the rows that add coverage (near-duplicates do not)
        target = min(math.ceil(0.25 * total), 300)
        assert 0.8 * target <= added <= target + 8


@pytest.mark.ray
def test_append_adds_new_images_whose_patches_then_score_zero(ray_local, tiny_bundle, tmp_path):
    from mspray.cli import main

    bundle, spec = tiny_bundle
    root = spec.split(":", 1)[1]
    new = tmp_path / "new_good"
    shutil.copytree(os.path.join(root, "synthetic", "test", "good"), new)
    new_uris = storage.list_files(str(new))
    before = load_bundle(bundle)
    images = load_images(new_uris, 64)
    raw_before = before.raw_scale_maps(images)
    assert all(float(raw_before[s].min()) > 1e-3 for s in before.scales)

    out = tmp_path / "appended"
    args = ["-q", "build-bank", "--bundle", bundle, "--data", f"folder:{new}", "--append",
            "--append-all", "--out", str(out), "--workers", "2"]  # fmt: skip
    assert main(args) == 0
    after = load_bundle(str(out))
    assert after.version != before.version
    assert after.threshold == before.threshold  # appending keeps the calibration
    raw_after = after.raw_scale_maps(images)
    for s in before.scales:
        n_patches = before.bank_embeddings(images, s).shape[0]
        assert after.banks[s].ntotal == before.banks[s].ntotal + n_patches
        # every inference patch of a new image is now in the bank: distance ~0
        assert float(raw_after[s].max()) < 1e-3
    # the coreset variant adds fewer patches and still brings the new images closer
    out2 = tmp_path / "appended_coreset"
    args = ["-q", "build-bank", "--bundle", bundle, "--data", f"folder:{new}", "--append",
            "--out", str(out2), "--workers", "2"]  # fmt: skip
    assert main(args) == 0
    sub = load_bundle(str(out2))
    raw_sub = sub.raw_scale_maps(images)
    for s in before.scales:
        added = sub.banks[s].ntotal - before.banks[s].ntotal
        assert 0 < added < after.banks[s].ntotal - before.banks[s].ntotal
        assert float(raw_sub[s].mean()) < 0.5 * float(raw_before[s].mean())


@pytest.mark.ray
def test_append_in_place_writes_a_new_version_and_keeps_the_served_one(
    ray_local, tiny_bundle, s3_bucket, capsys
):
    """build-bank --append on a bundle root (on S3): a new version, the pointer moved, the
    version it started from byte-for-byte unchanged and still loadable."""
    import json

    from mspray.artifacts.bundle import resolve_bundle
    from mspray.cli import main

    local_bundle, spec = tiny_bundle
    root = f"{s3_bucket}/models/served"
    served = save_bundle(load_bundle(local_bundle), root)
    before_files = {f: storage.read_bytes(f) for f in storage.list_files(served, suffixes=None)}
    new = os.path.join(spec.split(":", 1)[1], "synthetic", "test", "good")
    args = ["-q", "build-bank", "--bundle", root, "--data", f"folder:{new}", "--append",
            "--workers", "1"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    assert result["out"] == root and result["source"] == served
    assert result["version_uri"] == resolve_bundle(root) != served
    assert {f: storage.read_bytes(f) for f in before_files} == before_files
    old, now = load_bundle(served), load_bundle(root)
    assert now.version == result["version"] and now.meta["parent_version"] == old.version
    for s in old.scales:
        assert now.banks[s].ntotal > old.banks[s].ntotal
