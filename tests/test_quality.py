"""A quality floor: the detector clears AUROCs that a broken one would not.

On small synthetic sets (a woven texture and a nut object) the detector's image and pixel
AUROC must clear floors that three broken variants, computed from the same run, fall
below: the map transposed against its mask, a bank of shuffled embeddings, and a fusion
that subtracts a scale instead of adding it. On crops of one fabric strip whose training
crops overlap each other (near-duplicates, in random name order), the threshold must keep
its false-alarm promise on the normal test crops.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from mspray import maps as M
from mspray.bank import PatchBank
from mspray.config import tiny_config
from mspray.data.datasets import test_samples, train_paths
from mspray.data.images import load_images, load_mask
from mspray.data.synthetic import make_strip_dataset, make_synthetic_dataset
from mspray.evaluation import metrics
from mspray.evaluation.evaluate import evaluate
from mspray.pipeline.steps import fit_detector, split_holdout

SIZE = 64
#: (image, pixel) AUROC floors per set: the working detector clears them (measured: texture
#: 0.89 / 0.88, object 0.91 / 0.93), every broken variant misses one (transposed map: pixel
#: 0.72 / 0.83; shuffled bank: 0.69 / 0.52 and 0.61 / 0.50; subtracted scale: pixel 0.33 / 0.30)
FLOORS = {"texture": (0.85, 0.80), "object": (0.85, 0.88)}


@pytest.fixture(scope="module", params=["texture", "object"])
def run(request, tmp_path_factory):
    kind = request.param
    root = str(tmp_path_factory.mktemp(f"quality-{kind}"))
    make_synthetic_dataset(
        root, "q", n_train=12, n_test_good=10, n_test_defect=12, size=SIZE, seed=5, kind=kind
    )
    spec = f"mvtec:{root}"
    cfg = tiny_config(**{"train.epochs": 0})
    uris = train_paths(spec, "q")
    det = fit_detector(cfg, uris)
    samples = test_samples(spec, "q")
    images = load_images([s.path for s in samples], SIZE)
    masks = torch.stack([load_mask(s.mask_path, SIZE) for s in samples]).numpy() > 0
    labels = np.array([s.label for s in samples])
    return kind, det, uris, images, masks, labels


def _aurocs(labels, masks, maps, det) -> tuple[float, float]:
    cfg = det.cfg.model
    scores = M.image_scores(maps, cfg.score_window, cfg.score_window_stride)
    return (
        metrics.image_auroc(labels, scores.numpy()),
        metrics.pixel_auroc(masks, maps.numpy()),
    )


def test_the_detector_clears_the_floor_and_broken_variants_do_not(run):
    kind, det, uris, images, masks, labels = run
    IMAGE_FLOOR, PIXEL_FLOOR = FLOORS[kind]
    pred = det.predict(images)
    image, pixel = _aurocs(labels, masks, pred.maps, det)
    assert image >= IMAGE_FLOOR and pixel >= PIXEL_FLOOR, (kind, image, pixel)

    # 1. the map transposed against its mask: localisation is lost
    _, pixel_t = _aurocs(labels, masks, pred.maps.transpose(1, 2).contiguous(), det)
    assert pixel_t < PIXEL_FLOOR, (kind, pixel_t)

    # 2. a bank whose embeddings have their dimensions shuffled: distances mean nothing
    train, _ = split_holdout(uris, det.cfg.train.val_fraction, det.cfg.train.seed)
    bank_images = load_images(train, SIZE)
    rng = np.random.default_rng(0)
    banks = det.banks
    try:
        det.banks = {
            s: PatchBank.build(
                rng.permuted(det.bank_embeddings(bank_images, s), axis=1), det.cfg.bank
            )
            for s in det.scales
        }
        broken = det.predict(images)
    finally:
        det.banks = banks
    image_b, pixel_b = _aurocs(labels, masks, broken.maps, det)
    assert image_b < IMAGE_FLOOR or pixel_b < PIXEL_FLOOR, (kind, image_b, pixel_b)

    # 3. a fusion that subtracts the finest scale instead of adding it
    stats = det.stats
    raw = dict(pred.scale_maps)
    s0 = min(raw)
    z = {s: (m - stats[s][0]) / stats[s][1] for s, m in raw.items()}
    z[s0] = -z[s0]
    fused = M.gaussian_smooth(M.fuse_maps(z), det.cfg.model.smoothing_sigma)
    image_f, pixel_f = _aurocs(labels, masks, fused, det)
    assert image_f < IMAGE_FLOOR or pixel_f < PIXEL_FLOOR, (kind, image_f, pixel_f)


def test_overlapping_training_crops_keep_the_false_alarm_promise(tmp_path):
    # Training crops overlap their neighbours by 3/4 and are renamed in random order, as
    # random crops of one image would be: name order says nothing about near-duplicates.
    root = str(tmp_path)
    make_strip_dataset(root, "s", n_train=40, n_test_good=30, n_test_defect=9, size=SIZE,
                       step=16, seed=3)  # fmt: skip
    d = os.path.join(root, "s", "train", "good")
    names = sorted(os.listdir(d))
    perm = names[:]
    random.Random(0).shuffle(perm)
    for a in names:
        os.rename(os.path.join(d, a), os.path.join(d, "x" + a))
    for a, b in zip(names, perm, strict=True):
        os.rename(os.path.join(d, "x" + a), os.path.join(d, b))
    spec = f"mvtec:{root}"
    det = fit_detector(tiny_config(**{"train.epochs": 0}), train_paths(spec, "s"))
    m = evaluate(det, test_samples(spec, "s"))
    fa = m["false_alarms"]
    # promise ~2.4 % (40 calibration images): 30 normal crops may show at most 3 flags
    # (a near-duplicate gap of 0 on such crops flagged 22.5 % of the normals on real gravel)
    assert fa["flagged"] <= 3, fa
    assert m["image_auroc"] >= FLOORS["texture"][0], m
    assert m["pixel_auroc"] >= FLOORS["texture"][1], m
