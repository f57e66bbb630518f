"""The assembled detector: maps/scores from a tiny trained model, and the bundle contract."""

import numpy as np
import pytest
import torch

from mspray.artifacts.bundle import BundleError, load_bundle, read_meta, save_bundle
from mspray.data.datasets import test_samples, train_paths
from mspray.data.images import load_images
from mspray.decisions.summaries import quantile_sketch, summarize_maps, summary_scores, window_grid
from mspray.decisions.threshold import stats_from_moments
from mspray.detector import Detector, stage_seconds_per_image
from mspray.model.multiscale import MultiScaleEncoder
from mspray.pipeline.steps import fit_detector, split_holdout


@pytest.fixture(scope="module")
def tiny(synthetic_root, tmp_path_factory, tiny_cfg):
    """A detector trained for one epoch on the session's synthetic dataset, and its bundle."""
    cfg = tiny_cfg
    spec = f"mvtec:{synthetic_root}"
    out = str(tmp_path_factory.mktemp("bundle") / "b")
    det = fit_detector(cfg, train_paths(spec, "synthetic"), out=out)
    return det, out, spec


def test_predict_shapes_and_threshold_from_held_out_normals(tiny):
    det, _, spec = tiny
    samples = test_samples(spec, "synthetic")
    images = load_images([s.path for s in samples[:3]], 64)
    pred = det.predict(images)
    assert pred.maps.shape == (3, 64, 64) and pred.image_scores.shape == (3,)
    assert set(pred.scale_maps) == {32, 16} and pred.scale_scores[16].shape == (3,)
    assert det.threshold is not None and np.isfinite(det.threshold)
    assert torch.equal(pred.is_anomalous, pred.image_scores > det.threshold)
    assert det.meta["n_holdout_images"] >= 1


def test_bank_images_score_near_zero_and_holdout_does_not(tiny):
    det, _, spec = tiny
    train, val = split_holdout(train_paths(spec, "synthetic"), 0.25, det.cfg.train.seed)
    raw_train = det.raw_scale_maps(load_images(train[:2], 64))
    raw_val = det.raw_scale_maps(load_images(val[:2], 64))
    for s in det.scales:
        # coreset keeps half the patches, so bank images are close but not all at 0
        assert raw_train[s].mean() < raw_val[s].mean()


def test_bundle_round_trip_gives_identical_scores(tiny, tmp_path):
    det, out, spec = tiny
    loaded = load_bundle(out)
    assert loaded.version == det.version and len(loaded.version) == 12
    assert loaded.threshold == pytest.approx(det.threshold)
    assert {s: b.ntotal for s, b in loaded.banks.items()} == {
        s: b.ntotal for s, b in det.banks.items()
    }
    images = load_images([s.path for s in test_samples(spec, "synthetic")[:4]], 64)
    a, b = det.predict(images), loaded.predict(images)
    assert torch.equal(a.image_scores, b.image_scores)
    assert torch.equal(a.maps, b.maps)
    # Saving again is deterministic: the version is a content hash.
    assert save_bundle(loaded, str(tmp_path / "again")) == str(
        tmp_path / "again" / "versions" / det.version
    )


def test_bundle_stores_the_calibration_scores_its_threshold_came_from(tiny):
    det, out, spec = tiny
    meta = read_meta(out)
    cal = np.array(meta["calibration_scores"])
    calibration = meta["calibration"]
    assert len(cal) == calibration["n"] >= 1 and np.all(np.diff(cal) >= 0)
    # the threshold is the order statistic of these scores that the promise is about
    assert meta["threshold"] == pytest.approx(cal[calibration["rank"] - 1])
    assert "threshold_quantile" not in meta  # the legacy rule's key: the promise says it
    if calibration["source"] == "holdout":  # scores of the held-out normal images, sorted
        _, val = split_holdout(
            train_paths(spec, "synthetic"), det.cfg.train.val_fraction, det.cfg.train.seed
        )
        scores = det.predict(load_images(val, 64)).image_scores.numpy()
        np.testing.assert_allclose(cal, np.sort(scores), rtol=1e-5, atol=1e-6)


def test_quantile_sketch_caps_the_size_and_keeps_the_distribution():
    x = np.random.default_rng(0).normal(size=10_000)
    sketch = np.array(quantile_sketch(x, 1000))
    assert len(sketch) == 1000 and np.all(np.diff(sketch) >= 0)
    assert (sketch[0], sketch[-1]) == (x.min(), x.max())
    for q in (0.1, 0.5, 0.9, 0.99):
        assert np.quantile(sketch, q) == pytest.approx(np.quantile(x, q), abs=0.01)
    assert quantile_sketch(x[:5], 1000) == sorted(x[:5].tolist())


def test_bundle_files_load_without_pickle(tiny):
    det, out, _ = tiny
    from pathlib import Path

    assert sorted(p.name for p in Path(out).iterdir()) == ["latest", "versions"]
    version = Path(out) / "versions" / det.version
    names = sorted(p.name for p in version.iterdir())
    assert names == [
        "bank_16.faiss",
        "bank_32.faiss",
        "config.json",
        "meta.json",
        "model.safetensors",
    ]
    # safetensors is a JSON header + raw tensor bytes; nothing to unpickle.
    raw = (version / "model.safetensors").read_bytes()
    assert b"\x80\x04" not in raw[:64]


def test_incomplete_bundle_is_a_clear_error(tiny, tmp_path):
    det, root, _ = tiny
    import shutil
    from pathlib import Path

    out = Path(root) / "versions" / det.version  # a version folder: flat, meta.json in it
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "meta.json").unlink()
    with pytest.raises(BundleError, match="meta.json"):
        load_bundle(str(broken))
    shutil.copytree(out, tmp_path / "nobank")
    (tmp_path / "nobank" / "bank_16.faiss").unlink()
    with pytest.raises(BundleError, match="bank_16"):
        load_bundle(str(tmp_path / "nobank"))


def test_precision_auto_resolves_per_device_and_rejects_cpu_fp16():
    from mspray.detector import cpu_has_native_bf16, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", cpu)


def test_channels_last_and_bf16_modes_score_like_fp32_nchw(tiny):
    from mspray.detector import Detector

    det, _, spec = tiny
    images = load_images([s.path for s in test_samples(spec, "synthetic")[:2]], 64)

    def scored(**over):
        d = Detector(det.cfg.replace(**over), det.model, det.banks, det.stats, det.threshold)
        return d, d.predict(images)

    d0, ref = scored(**{"score.precision": "fp32", "score.channels_last": False})
    d1, cl = scored(**{"score.precision": "fp32", "score.channels_last": True})
    assert d1.inference_mode == {"runtime": "torch", "precision": "fp32", "channels_last": True}
    torch.testing.assert_close(cl.maps, ref.maps, rtol=1e-4, atol=1e-4)
    d2, bf = scored(**{"score.precision": "bf16"})
    assert d2.inference_mode["precision"] == "bf16"
    # bf16 keeps ~3 significant digits: the maps move a little, the ranking barely
    assert not torch.equal(bf.maps, ref.maps)
    corr = np.corrcoef(bf.maps.flatten().numpy(), ref.maps.flatten().numpy())[0, 1]
    assert corr > 0.98


def test_map_summaries_give_predict_scores_under_any_stats(tiny):
    """Calibration keeps only moments and window means of the raw maps (MapSummary): the
    fused scores it derives must be predict's, and the stats those of the pixels."""
    det, _, spec = tiny
    images = load_images([s.path for s in test_samples(spec, "synthetic")[:4]], 64)
    raw = det.raw_scale_maps(images)
    summary = summarize_maps(det, raw)
    for s in det.scales:
        mean, std = stats_from_moments(summary.moments[s])
        assert mean == pytest.approx(float(raw[s].double().mean()), rel=1e-9)
        assert std == pytest.approx(float(raw[s].double().std(unbiased=False)), rel=1e-6)
    assert summary.pooled[det.scales[0]].shape[1:] == window_grid(det.cfg)
    other = {s: (m * 0.5, sd * 2.0 + 0.1) for s, (m, sd) in det.stats.items()}
    for stats in (det.stats, other):
        det_stats, det.stats = det.stats, stats
        try:
            expected = det.predict(images).image_scores
        finally:
            det.stats = det_stats
        got = summary_scores(det, summary.pooled, stats)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_torch_and_faiss_search_give_the_same_maps(tiny):
    from mspray.detector import Detector

    det, _, spec = tiny
    images = load_images([s.path for s in test_samples(spec, "synthetic")[:3]], 64)
    assert det.cfg.bank.search == "torch"  # the default
    other = det.cfg.replace(**{"bank.search": "faiss"})
    faiss_det = Detector(other, det.model, det.banks, det.stats, det.threshold, det.meta)
    a, b = det.predict(images), faiss_det.predict(images)
    for s in det.scales:  # faiss's expansion rounds; the torch search is the exact one
        torch.testing.assert_close(a.scale_maps[s], b.scale_maps[s], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.image_scores, b.image_scores, rtol=1e-4, atol=1e-4)


def test_cell_and_dense_torch_searches_give_identical_maps(tiny):
    from mspray.bank.search import CellSearch
    from mspray.detector import Detector

    det, _, spec = tiny
    images = load_images([s.path for s in test_samples(spec, "synthetic")[:3]], 64)
    assert det.search_cells  # auto, on CPU
    dense_cfg = det.cfg.replace(**{"bank.search_cells": "off"})
    dense = Detector(dense_cfg, det.model, det.banks, det.stats, det.threshold, det.meta)
    a, b = det.predict(images), dense.predict(images)
    searchers = [v for s in det.scales for v in det.banks[s]._searchers.values()]
    assert max(v.cells for v in searchers if isinstance(v, CellSearch)) >= 4  # cells in use
    for s in det.scales:  # both are the exact fp32 search
        assert torch.equal(a.scale_maps[s], b.scale_maps[s])


def test_evaluate_records_where_the_time_goes(tiny):
    from mspray.detector import stage_order
    from mspray.evaluation.evaluate import evaluate

    det, _, spec = tiny
    report = evaluate(det, test_samples(spec, "synthetic")[:5], batch_size=2)
    stages = report["stage_seconds_per_image"]
    # a random-init trunk has a stem per scale: no shared "stem" stage
    assert det.model.shared_stem(det.scales) is None
    assert list(stages) == [k for k in stage_order(det.scales) if k != "stem"]
    assert all(v > 0 for v in stages.values())
    # encoders sharing a stem time it once, apart from the rest of each encoder
    shared = Detector(det.cfg, MultiScaleEncoder(det.cfg.replace(**{"model.shared_stem": True})))
    shared.banks, shared.stats = det.banks, det.stats
    timings: dict[str, float] = {}
    paths = [s.path for s in test_samples(spec, "synthetic")[:2]]
    shared.predict(load_images(paths, det.cfg.model.image_size), timings)
    assert list(stage_seconds_per_image(timings, 2, det.scales)) == stage_order(det.scales)[1:]
    model = sum(v for k, v in stages.items() if k != "decode")
    assert model == pytest.approx(report["seconds_per_image"], rel=0.2)
