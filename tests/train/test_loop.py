import copy

import pytest
import torch

from mspray.config import MSPrayConfig
from mspray.train.loop import ScaleTrainer, build_scale_model


def _cfg(**kw):
    base = {
        "train.epochs": 3,
        "train.samples_per_image": 8,
        "train.batch_size": 16,
        "train.n_centers": 4,
        "train.center_update_every": 2,
        "train.lr": 1e-3,
        "model.image_size": 64,
        "model.scales": (16,),
        "model.strides": (4,),
        "model.embed_dim": 16,
    }
    base.update(kw)
    return MSPrayConfig().replace(**base)


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g)


def test_training_updates_every_parameter_and_keeps_the_best_validation_model():
    cfg = _cfg()
    model = build_scale_model(cfg, 16, None)
    before = copy.deepcopy(model.state_dict())
    tr = ScaleTrainer(cfg, 16, model)
    hist = tr.fit(_images(), _images(2, seed=1), progress=False)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert all(k in hist[-1] for k in ("svdd", "cos", "ssl", "kmeans", "val_loss"))
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert set(changed) == set(before), set(before) - set(changed)  # angle head's last layer too
    best = min(h["val_loss"] for h in hist)
    assert tr.best_val == best
    for k, v in tr.best_state.items():
        assert torch.equal(v, after[k])
    assert tr.centers.shape == (4, 16)


def test_ablation_trains_without_a_loss():
    cfg = _cfg(**{"train.losses": ("svdd", "cos", "kmeans"), "train.epochs": 1})
    tr = ScaleTrainer(cfg, 16, build_scale_model(cfg, 16, None))
    hist = tr.fit(_images(), None, progress=False)
    assert "ssl" not in hist[0] and hist[0]["val_loss"] == hist[0]["loss"]


def test_resume_from_state_matches_an_uninterrupted_run():
    cfg = _cfg(**{"train.epochs": 3})
    imgs, val = _images(), _images(2, seed=1)
    full = ScaleTrainer(cfg, 16, build_scale_model(cfg, 16, None))
    full.fit(imgs, val, progress=False)

    short = MSPrayConfig.from_dict(
        {**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "epochs": 2}}
    )
    first = ScaleTrainer(short, 16, build_scale_model(cfg, 16, None))
    first.fit(imgs, val, progress=False)
    state = first.state_dict()
    resumed = ScaleTrainer(cfg, 16, build_scale_model(cfg, 16, None))
    resumed.load_state_dict(state)
    # Undo the end-of-fit swap to the best weights: resume continues from the last epoch.
    resumed.core.load_state_dict(state["model"])
    resumed.fit(imgs, val, progress=False)
    assert resumed.epoch == 3
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], rel=1e-4)


def test_time_budget_stops_training_and_keeps_the_best_model():
    cfg = _cfg(**{"train.epochs": 50, "train.max_minutes": 1e-6})
    tr = ScaleTrainer(cfg, 16, build_scale_model(cfg, 16, None))
    hist = tr.fit(_images(), _images(2, seed=1), progress=False)
    assert len(hist) == 1 and hist[0]["stopped_early"] == 1.0
    assert tr.epoch == 1 and tr.best_state is not None
