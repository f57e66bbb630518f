"""Tests for mspray.evaluation.metrics: AUROC, AUPRO (hand-computed and brute force), F1-max."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from mspray.evaluation.metrics import aupro, compute_metrics, f1_max, image_auroc, pixel_auroc


def _brute_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """AUPRO by the definition: every distinct threshold, every region, one at a time."""
    masks = masks.astype(bool)
    regions = []
    for m, s in zip(masks, maps, strict=True):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [s[lab == k] for k in range(1, n + 1)]
    normal = maps[~masks]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(float(np.mean(normal >= t)))
        ys.append(float(np.mean([np.mean(r >= t) for r in regions])))
    area = 0.0
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False):
        if x0 >= limit:
            break
        if x1 > limit:  # cut the last segment at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    # Two 2×3 images. Region A (image 0, 3 pixels), region B (image 1, 1 pixel); 8 normal
    # pixels. A's scores: 0.9, 0.5, 0.4; B's: 0.7; normals: 0.8, 0.6, 0.4, 0.35, 0.3, 0.1,
    # 0.05, 0.0 (one normal ties with an A pixel at 0.4).
    masks = np.array([[[1, 1, 0], [1, 0, 0]], [[0, 0, 0], [0, 0, 1]]])
    maps = np.array([[[0.9, 0.5, 0.8], [0.4, 0.6, 0.4]], [[0.35, 0.3, 0.1], [0.05, 0.0, 0.7]]])
    return masks, maps


@pytest.mark.parametrize("num_thresholds", [0, 200])
def test_aupro_hand_computed(num_thresholds: int) -> None:
    # Each A pixel adds 1/(2·3) = 1/6 to PRO, B's pixel adds 1/2. Lowering the threshold:
    #   >0.8:  FPR 0,   PRO 1/6  (0.9 of A)
    #   0.8:   FPR 1/8, PRO 1/6  (a normal pixel)
    #   0.7:   FPR 1/8, PRO 2/3  (B)
    #   0.6:   FPR 2/8, PRO 2/3
    #   0.5:   FPR 2/8, PRO 5/6  (A)
    #   0.4:   FPR 3/8, PRO 1    (a normal and A tie: a diagonal step)
    # Area up to FPR 0.3: 1/6·1/8 + 2/3·1/8 + trapezoid on [0.25, 0.3] from 5/6 to
    # 5/6 + (0.05/0.125)·(1/6) = 0.9, i.e. (5/6 + 0.9)/2·0.05 = 13/300.
    # Total 1/48 + 1/12 + 13/300 = 177/1200; divided by 0.3: 59/120.
    masks, maps = _hand_case()
    assert aupro(masks, maps, 0.3, num_thresholds) == pytest.approx(59 / 120, abs=1e-12)


def test_aupro_hand_computed_other_limit() -> None:
    # Up to FPR 0.125 only the first flat piece counts: PRO 1/6 throughout.
    masks, maps = _hand_case()
    assert aupro(masks, maps, fpr_limit=0.125, num_thresholds=0) == pytest.approx(1 / 6)
    # Up to FPR 1 the curve ends at (1, 1); compare with the brute-force definition.
    assert aupro(masks, maps, 1.0, 0) == pytest.approx(_brute_aupro(masks, maps, 1.0))


def test_aupro_matches_brute_force_on_random_data() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 16, 16), dtype=np.uint8)
    masks[0, 2:6, 3:8] = 1
    masks[0, 10:12, 10:15] = 1
    masks[1, 5:9, 5:6] = 1
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    maps = np.round(maps, 1)  # ties between normal and anomalous pixels
    for limit in (0.05, 0.3, 1.0):
        expected = _brute_aupro(masks, maps, limit)
        assert aupro(masks, maps, limit, num_thresholds=0) == pytest.approx(expected, abs=1e-12)


def test_aupro_sampled_thresholds_close_to_exact() -> None:
    # 60k normal pixels: far more than 200 thresholds, so the default is an approximation.
    rng = np.random.default_rng(4)
    masks = np.zeros((4, 128, 128), dtype=bool)
    masks[:, 40:60, 40:70] = True
    masks[2, 100:104, 5:9] = True
    maps = rng.normal(size=masks.shape) + 2.0 * masks
    exact = aupro(masks, maps, num_thresholds=0)
    assert 0.2 < exact < 0.95
    assert aupro(masks, maps) == pytest.approx(exact, abs=0.5 / 199)


def test_aupro_perfect_map_is_one() -> None:
    rng = np.random.default_rng(5)
    masks = np.zeros((3, 32, 32), dtype=np.float32)
    masks[0, 4:10, 4:10] = 1
    masks[2, 20:21, 5:30] = 1
    maps = masks * 2 + rng.random(masks.shape)  # every anomalous pixel above every normal
    for n in (0, 200):
        assert aupro(masks, maps, num_thresholds=n) == pytest.approx(1.0)
    assert aupro(torch.from_numpy(masks), torch.from_numpy(maps)) == pytest.approx(1.0)


def test_aupro_uses_8_connectivity_within_each_image() -> None:
    # Image 0: (0,0) touches (1,1) only at a corner; (1,1)-(1,2) are 4-neighbours. With
    # 8-connectivity that is ONE region of 3 pixels; only (0,0) scores above the normals,
    # so PRO is 1/3 all along (4-connectivity would give two regions and mean(1, 0) = 0.5).
    masks = np.zeros((1, 3, 3), dtype=int)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = 1
    maps = np.full((1, 3, 3), 0.5)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 1, 2] = 1.0, 0.0, 0.0
    assert aupro(masks, maps) == pytest.approx(1 / 3)
    # Regions in different images never merge, even at the same position: here two
    # regions (PRO 1 and 0, mean 0.5), not one of 3 pixels (PRO 1/3).
    masks = np.zeros((2, 3, 3), dtype=int)
    masks[0, 0, 0] = 1
    masks[1, 0, 0] = masks[1, 0, 1] = 1
    maps = np.full((2, 3, 3), 0.5)
    maps[0, 0, 0], maps[1, 0, 0], maps[1, 0, 1] = 1.0, 0.0, 0.0
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_undefined_and_invalid() -> None:
    assert math.isnan(aupro(np.zeros((2, 4, 4)), np.random.rand(2, 4, 4)))
    assert math.isnan(aupro(np.ones((1, 4, 4)), np.random.rand(1, 4, 4)))  # no normal pixel
    with pytest.raises(ValueError, match="shape"):
        aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), fpr_limit=0.0)
    with pytest.raises(ValueError, match="NaN"):
        aupro(np.eye(4)[None], np.full((1, 4, 4), np.nan))


def test_image_auroc_known_values() -> None:
    # Pairs (neg, pos): 0.1<0.35, 0.1<0.8, 0.4>0.35, 0.4<0.8 -> 3 of 4 ordered right.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert image_auroc(torch.tensor([1, 0]), torch.tensor([2.0, 1.0])) == 1.0
    assert image_auroc([0, 1, 0, 1], [1.0, 1.0, 1.0, 1.0]) == 0.5
    assert math.isnan(image_auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError):
        image_auroc([0, 1], [0.1, 0.2, 0.3])


def test_pixel_auroc_known_values() -> None:
    masks = np.array([[[0, 1], [0, 1]]])
    maps = np.array([[[0.1, 0.35], [0.4, 0.8]]])
    assert pixel_auroc(masks, maps) == pytest.approx(0.75)
    assert pixel_auroc(masks * 255, maps) == pytest.approx(0.75)  # 0/255 masks work too
    assert math.isnan(pixel_auroc(np.zeros((2, 3, 3)), np.random.rand(2, 3, 3)))


def test_f1_max_hand_computed() -> None:
    # Sorted by score: 0.9(+) 0.6(-) 0.4(+) 0.3(+) 0.1(-). Predicting score >= t:
    #   t=0.9: P=1,   R=1/3 -> F1 1/2      t=0.6: P=1/2, R=1/3 -> F1 2/5
    #   t=0.4: P=2/3, R=2/3 -> F1 2/3      t=0.3: P=3/4, R=1   -> F1 6/7 (best)
    #   t=0.1: P=3/5, R=1   -> F1 3/4
    f1, thr = f1_max([0, 1, 1, 0, 1], [0.1, 0.9, 0.4, 0.6, 0.3])
    assert f1 == pytest.approx(6 / 7)
    assert thr == pytest.approx(0.3)
    assert f1_max([1, 0], [1.0, 0.0]) == (1.0, 1.0)
    assert all(math.isnan(v) for v in f1_max([0, 0], [0.2, 0.1]))


def test_compute_metrics_keys_types_and_json() -> None:
    labels = [0, 0, 1, 1]
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    out = compute_metrics(labels, scores)
    assert set(out) == {"image_auroc", "pixel_auroc", "pixel_aupro", "f1_max", "f1_threshold"}
    assert out["image_auroc"] == pytest.approx(0.75)
    assert out["pixel_auroc"] is None and out["pixel_aupro"] is None
    assert type(out["f1_max"]) is float and type(out["f1_threshold"]) is float

    masks, maps = _hand_case()
    masks = np.concatenate([masks, np.zeros((2, 2, 3), dtype=int)])
    maps = np.concatenate([maps, np.zeros((2, 2, 3))])
    out = compute_metrics(labels, scores, torch.from_numpy(masks), torch.from_numpy(maps))
    assert out["pixel_aupro"] == pytest.approx(aupro(masks, maps))
    assert out["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps))
    assert all(type(v) is float for v in out.values())
    json.dumps(out, allow_nan=False)

    # Undefined metrics become None, never NaN.
    out = compute_metrics([0, 0], [0.1, 0.2], np.zeros((2, 2, 2)), np.random.rand(2, 2, 2))
    assert out == dict.fromkeys(out)
    json.dumps(out, allow_nan=False)
    with pytest.raises(ValueError, match="maps"):
        compute_metrics(labels, scores, masks=masks)
