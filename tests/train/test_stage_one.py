"""Stage one: a deterministic trunk trained against synthetic anomalies, in ImageNet's layout."""

import torch

from mspray.config import tiny_config
from mspray.model.multiscale import build_scale_model
from mspray.train.stage_one import _batch, train_stage_one


def _cfg(**kw):
    base = {"model.scales": (16,), "model.strides": (4,), "train.stage_one": True}
    base.update({"train.stage_one_steps": 3, "train.stage_one_batch": 4, **kw})
    return tiny_config(**base)


def _images(n=4, seed=0):
    x = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.avg_pool2d(x, 5, 1, 2)


def test_stage_one_is_deterministic_and_initialises_every_scale_like_imagenet_weights():
    cfg = _cfg()
    a, summary = train_stage_one(cfg, _images())
    b, _ = train_stage_one(cfg, _images())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c, _ = train_stage_one(_cfg(**{"train.seed": 1}), _images())
    assert not torch.equal(a["features.0.weight"], c["features.0.weight"])
    assert summary["steps"] == 3 and summary["kinds"] == ["cutpaste", "scar"]
    assert summary["crop"] == 32 and summary["from"] == "random init"
    # the trunk goes where ImageNet's features.* go: every scale starts from it
    enc = build_scale_model(cfg, 16, a).encoder
    for k, v in enc.features.state_dict().items():
        assert torch.equal(v, a[f"features.{k}"])


def test_stage_one_trains_the_trunk_it_is_given():
    cfg = _cfg()
    start, _ = train_stage_one(cfg, _images())
    after, summary = train_stage_one(cfg, _images(), start)
    assert summary["from"] == "given trunk"
    assert all(k in after for k in start)
    assert not torch.equal(after["features.0.weight"], start["features.0.weight"])


def test_half_the_crops_carry_an_anomaly_of_the_stage_one_kinds():
    g = torch.Generator().manual_seed(0)
    x, y = _batch(_images(), ("cutpaste", "scar"), 8, 32, g)
    assert x.shape == (8, 3, 32, 32) and y.tolist() == [0, 1, 0, 2, 0, 1, 0, 2]
