"""Synthetic-anomaly selection: honest normals, the bank inference builds, scores reused."""

import logging
import math

import pytest
import torch

from mspray.config import tiny_config
from mspray.config.run import use_run
from mspray.detector import Detector
from mspray.model.multiscale import MultiScaleEncoder, build_scale_model
from mspray.train import selection
from mspray.train.loop import ScaleTrainer
from mspray.train.selection import COPIES, SelectionSet, fused_choice, selection_kinds


def _rows(x):
    return {tuple(r.tolist()) for r in x.flatten(1)[:, :8]}


def _images(n, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_few_held_out_images_are_topped_up_with_training_images_and_it_is_said(caplog):
    cfg = tiny_config()
    train, val = _images(10), _images(2, seed=1)
    with caplog.at_level(logging.INFO, logger="mspray.train.selection"):
        sel = SelectionSet.make(cfg, train, val)
    assert sel.info["normals_held_out"] == 2 and sel.info["normals_from_training"] == 5
    assert "topped up with 5 training images" in caplog.text
    assert sel.clean.shape[0] == 7 and sel.anomalous.shape[0] == 7 * COPIES
    assert sel.bank_images.shape[0] == 5 and sel.masks.any()
    # the window of a held-out image is that image's window, not a training image's
    w = sel.info["window"]
    assert any(
        torch.equal(sel.clean[0], val[0, :, y : y + w, x : x + w])
        for y in range(65 - w)
        for x in range(65 - w)
    )


def test_enough_held_out_images_need_no_training_images(caplog):
    cfg = tiny_config()
    with caplog.at_level(logging.INFO, logger="mspray.train.selection"):
        sel = SelectionSet.make(cfg, _images(40), _images(32, seed=1))
    assert sel.info["normals_from_training"] == 0 and "topped up" not in caplog.text
    assert sel.bank_images.shape[0] == selection.MAX_BANK_IMAGES


def test_selection_scores_are_the_scores_of_inference_with_its_bank_images():
    # The selection bank is built as inference builds its bank (greedy coreset at the bank
    # stride), so the selection scores are what a detector with that bank would give.
    cfg = tiny_config(**{"bank.coreset_ratio": 0.02, "model.scales": (16,), "model.strides": (4,)})
    sel = SelectionSet.make(cfg, _images(30), _images(3, seed=1))
    models = {s: build_scale_model(cfg, s, None) for s in cfg.model.scales}
    rows = sel.bank_images.shape[0] * 13**2  # whole 64-px images, 16-px patches at stride 4
    ratio = selection.bank_ratio(cfg, models[16].encoder, sel, rows)
    assert ratio == pytest.approx(math.ceil(0.02 * 30 * 13**2) / rows, abs=1 / rows)
    assert ratio < 1
    det_cfg = cfg.replace(**{"bank.coreset_ratio": ratio})
    det = Detector(det_cfg, MultiScaleEncoder(det_cfg, models))
    det.build_banks(sel.bank_images)
    assert det.banks[16].ntotal == math.ceil(0.02 * 30 * 13**2)  # the real bank's size
    want = det.all_patch_scores(torch.cat([sel.clean, sel.anomalous]))
    for s, m in models.items():
        got = selection._patch_scores(m.encoder, sel, cfg, cfg.stride_for(s), "cpu")
        torch.testing.assert_close(got, want[s], rtol=1e-4, atol=1e-4)


def test_the_fused_check_reuses_the_scores_of_encoders_scored_in_training():
    cfg = tiny_config(**{"model.scales": (16,), "model.strides": (4,)})
    train, val = _images(8), _images(3, seed=1)
    tr = ScaleTrainer(cfg, 16, build_scale_model(cfg, 16, None))
    tr.fit(train, val)
    best = build_scale_model(cfg, 16, None)
    best.load_state_dict(tr.best_model_state())
    untrained = build_scale_model(cfg, 16, None)
    calls = []
    for m in (best, untrained):
        m.encoder.register_forward_hook(lambda *a: calls.append(1))
    pick, table = fused_choice(
        cfg, {"selected": {16: best.encoder}, "untrained": {16: untrained.encoder}}, train, val
    )
    assert calls == []  # both were candidates of the per-scale selection: nothing re-run
    untrained_score = table["untrained"]["per_scale"]["16"]["score"]
    assert untrained_score == pytest.approx(tr.candidates[0]["score"])


def test_selection_shows_progress(capsys):
    cfg = tiny_config(**{"model.scales": (16,), "model.strides": (4,)})
    sel = SelectionSet.make(cfg, _images(8), _images(3, seed=1))
    enc = build_scale_model(cfg, 16, None).encoder
    selection._CACHE.clear()  # scored by another test with the same weights
    with use_run(progress=True):  # the suite runs quiet (tests/conftest.py)
        selection.scale_maps(enc, sel, cfg)
    assert "selection scale 16" in capsys.readouterr().err


def test_selection_leaves_out_the_anomaly_kinds_stage_one_trains_on():
    cfg = tiny_config(**{"train.stage_one": True, "train.stage_one_kinds": ("cutpaste", "scar")})
    assert selection_kinds(cfg) == ("noise", "colour")
    assert SelectionSet.make(cfg, _images(8), _images(3, seed=1)).info["kinds"] == [
        "noise",
        "colour",
    ]
    assert len(selection_kinds(tiny_config())) == 4  # without stage one: every kind
