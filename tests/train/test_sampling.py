import math

import pytest
import torch

from mspray.model.encoder import N_ANGLES
from mspray.train import sampling


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _angle(off):
    """The angle of ``n×2`` (dy, dx) offsets, in [0, 2π) (y points down)."""
    return torch.atan2(-off[:, 0].double(), off[:, 1].double()) % (2 * math.pi)


def _angle_class(off):
    """Nearest angle class of offsets: the inverse of ``sampling.angle_offsets``."""
    return torch.round(_angle(off) / (2 * math.pi / N_ANGLES)).long() % N_ANGLES


def _inside(pos, h, w, p):
    return bool((pos >= 0).all() and (pos[:, 0] <= h - p).all() and (pos[:, 1] <= w - p).all())


@pytest.mark.parametrize("p", [64, 32, 16])
def test_angle_labels_are_correct_by_construction(p):
    h, w = 4 * p, 5 * p
    img = torch.zeros(20000, dtype=torch.long)
    s = sampling.sample_angles(img, h, w, p, _gen(p))
    m, n = s.pos
    assert _inside(m, h, w, p) and _inside(n, h, w, p)  # nothing ever clipped
    off = n - m
    # Recompute the angle of every pair from the positions alone.
    ang = _angle(off)
    assert torch.equal(_angle_class(off), s.labels)
    # ... and the angle is within a few degrees of the class centre, not merely nearest.
    centre = s.labels.double() * 2 * math.pi / N_ANGLES
    diff = torch.remainder(ang - centre + math.pi, 2 * math.pi) - math.pi
    assert diff.abs().max() < math.radians(5)
    dist = off.double().norm(dim=1)
    assert dist.min() >= 0.85 * p and dist.max() <= 1.15 * p
    assert torch.bincount(s.labels, minlength=N_ANGLES).min() > 1000  # all classes used


def test_offset_angle_class_inverts_angle_offsets():
    labels = torch.arange(N_ANGLES).repeat(50)
    off = sampling.angle_offsets(labels, 28.0, 36.0, _gen())
    assert torch.equal(_angle_class(off), labels)


@pytest.mark.parametrize("p, r", [(64, 4), (32, 2), (16, 1)])
def test_svdd_pairs_are_close_neighbours(p, r):
    s = sampling.sample_svdd(torch.zeros(5000, dtype=torch.long), 100, 120, p, _gen())
    i, j = s.pos
    d = (j - i).abs()
    assert d.max() <= r and (d.sum(1) > 0).all()
    assert _inside(i, 100, 120, p) and _inside(j, 100, 120, p)
    assert {int(v) for v in (j - i)[:, 0].unique()} == set(range(-r, r + 1))


def test_triplets_far_patch_does_not_overlap_the_anchor():
    p = 32
    s = sampling.sample_triplets(torch.zeros(4000, dtype=torch.long), 128, 128, p, _gen())
    i, j, k = s.pos
    assert ((k - i).abs().amax(1) >= p).all()
    assert ((j - i).abs().amax(1) <= 2).all()
    assert _inside(k, 128, 128, p)


def test_balanced_images_uses_every_image_evenly():
    idx = sampling.balanced_images(7, 30, _gen())
    counts = torch.bincount(idx, minlength=7)
    assert counts.sum() == 30 and counts.max() - counts.min() <= 1


def test_crop_matches_slicing():
    images = torch.randn(3, 3, 40, 50)
    img = torch.tensor([0, 2, 1])
    pos = torch.tensor([[0, 0], [5, 7], [24, 34]])
    out = sampling.crop(images, img, pos, 16)
    for n in range(3):
        y, x = pos[n].tolist()
        assert torch.equal(out[n], images[img[n], :, y : y + 16, x : x + 16])


def test_images_too_small_for_label_free_pairs_skip_the_ssl_term():
    # 128 px and p=64 (the random-init recipe's size): the distance is never shrunk to fit
    img = torch.zeros(50, dtype=torch.long)
    with pytest.raises(ValueError, match="cannot hold angle pairs"):
        sampling.sample_angles(img, 128, 128, 64, _gen())
    from mspray.config import MSPrayConfig
    from mspray.train.summary import run_summary

    cfg = MSPrayConfig().replace(**{"model.image_size": 128})
    assert "ssl" not in sampling.without_leaky_ssl(cfg, 64).losses
    assert "ssl" in sampling.without_leaky_ssl(cfg, 32).losses
    alone = cfg.replace(**{"train.losses": ("ssl",)})  # an ablation keeps its only loss
    assert sampling.without_leaky_ssl(alone, 64).losses == ("ssl",)
    assert "cannot hold" in run_summary([], cfg, None, 64)["ssl_skipped"]
    assert run_summary([], cfg, None, 32)["ssl_skipped"] is None


def _binned_classifier_accuracy(pos, labels, cell=8):
    """Accuracy on the second half of a majority-label-per-cell classifier fitted on the
    first half (features: the positions only)."""
    key = (pos[:, 0] // cell) * 10_000 + pos[:, 1] // cell
    half = len(key) // 2
    counts = {}
    for k, y in zip(key[:half].tolist(), labels[:half].tolist(), strict=True):
        counts.setdefault(k, torch.zeros(N_ANGLES))[y] += 1
    pred = torch.tensor(
        [int(counts[k].argmax()) if k in counts else 0 for k in key[half:].tolist()]
    )
    return float((pred == labels[half:]).float().mean()), len(key) - half


@pytest.mark.parametrize("size", [128, 256])
@pytest.mark.parametrize("p", [64, 32, 16])
def test_neither_patchs_position_tells_the_angle(size, p):
    # A classifier on ONE patch's position (either one) stays within the leak limit (2x
    # chance, plus sampling noise); the second patch at m + offset with m label-free was
    # 0.72 at 256 px and p=64. Where the limit cannot be met, there are no pairs at all.
    img = torch.zeros(40_000, dtype=torch.long)
    if sampling.ssl_skip_reason(size, size, p):
        assert (size, p) == (128, 64)
        return
    s = sampling.sample_angles(img, size, size, p, _gen(size + p))
    bound = sampling.angle_leak(size, size, p)
    assert bound <= sampling.LEAK_LIMIT / N_ANGLES
    for pos in s.pos:
        acc, n = _binned_classifier_accuracy(pos, s.labels, cell=4)
        noise = 3.3 * math.sqrt(bound * (1 - bound) / n)
        assert acc < bound + noise, (acc, bound + noise)
