import copy

import pytest
import torch

from mspray.config import MSPrayConfig
from mspray.model.multiscale import build_scale_model, normalize
from mspray.train.loop import ScaleTrainer, run_summary


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


def test_training_updates_every_parameter_and_selects_by_validation_score():
    cfg = _cfg(**{"train.selection": "loss"})
    model = build_scale_model(cfg, 16, None)
    before = copy.deepcopy(model.state_dict())
    tr = ScaleTrainer(cfg, 16, model)
    hist = tr.fit(_images(), _images(2, seed=1))
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for k in ("svdd", "cos", "ssl", "kmeans", "ssl_acc", "spread", "val_score", "val_spread"):
        assert k in hist[-1], k
    for k in ("val_svdd", "val_cos", "val_ssl", "val_ssl_acc", "val_kmeans"):
        assert k in hist[-1], k
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert set(changed) == set(before), set(before) - set(changed)  # angle head's last layer too
    best = min(hist, key=lambda h: h["val_score"])
    assert tr.best_val == best["val_score"] and tr.best_epoch == best["epoch"]
    assert tr.centers.shape == (4, 16)


def test_validation_score_does_not_change_when_embeddings_are_rescaled():
    # Model selection must not favour an encoder just because its embeddings shrink.
    cfg = _cfg(**{"train.losses": ("svdd", "cos", "kmeans")})
    model = build_scale_model(cfg, 16, None)
    tr = ScaleTrainer(cfg, 16, model)
    val = normalize(_images(2, seed=1))
    a = tr.validate(val)
    with torch.no_grad():  # the last layer is linear: scaling it scales every embedding
        model.encoder.head[-1].weight.mul_(10.0)
        model.encoder.head[-1].bias.mul_(10.0)
    b = tr.validate(val)
    assert b["val_spread"] == pytest.approx(10 * a["val_spread"], rel=1e-3)
    assert b["val_svdd"] == pytest.approx(10 * a["val_svdd"], rel=1e-3)
    assert b["val_score"] == pytest.approx(a["val_score"], rel=1e-3)


class _ScriptedScore(ScaleTrainer):
    """A trainer whose validation score is best at epoch 1, so selected != last."""

    def validate(self, images):
        out = super().validate(images)
        out["val_score"] = float(self.epoch)  # self.epoch = epochs done before this one
        return out


def test_fit_keeps_the_last_weights_for_resuming_and_the_selected_ones_apart():
    cfg = _cfg(**{"train.epochs": 3, "train.selection": "loss"})
    tr = _ScriptedScore(cfg, 16, build_scale_model(cfg, 16, None))
    seen = {}
    tr.fit(
        _images(),
        _images(2, seed=1),
        on_epoch_end=lambda t, m: seen.setdefault(t.epoch, copy.deepcopy(t.core.state_dict())),
    )
    assert tr.best_epoch == 1
    state = tr.state_dict()
    # The optimizer state is the last step's, so the weights beside it must be too.
    for k, v in state["model"].items():
        assert torch.equal(v, seen[3][k]), k
    for k, v in tr.best_model_state().items():
        assert torch.equal(v, seen[1][k]), k


def test_synthetic_selection_ranks_every_epoch_the_untrained_one_included():
    cfg = _cfg(**{"train.epochs": 2, "train.select_every": 1})
    model = build_scale_model(cfg, 16, None)
    start = copy.deepcopy(model.state_dict())
    tr = ScaleTrainer(cfg, 16, model)
    hist = tr.fit(_images(), _images(2, seed=1))
    table = tr.candidates
    assert [c["epoch"] for c in table] == [0, 1, 2]
    for c in table:
        assert 0 <= c["image_auroc"] <= 1 and 0 <= c["pixel_auroc"] <= 1
        assert c["score"] == pytest.approx((c["image_auroc"] + c["pixel_auroc"]) / 2)
    best = max(table, key=lambda c: c["score"])  # max() keeps the first of equal scores
    assert tr.best_epoch == best["epoch"] == hist[-1]["best_epoch"]
    summary = run_summary(hist, cfg, table)
    assert summary["selection"] == "synthetic" and len(summary["candidates"]) == 3
    # A destructive learning rate: the untrained encoder must win and come back unchanged
    # (on images with some structure: in pure noise no anomaly stands out to rank by).
    cfg = _cfg(**{"train.epochs": 2, "train.lr": 10.0})
    tr = ScaleTrainer(cfg, 16, build_scale_model(cfg, 16, None))
    smooth = lambda x: torch.nn.functional.avg_pool2d(x, 5, 1, 2)  # noqa: E731
    tr.fit(smooth(_images()), smooth(_images(2, seed=1)))
    assert tr.best_epoch == 0, tr.candidates
    for k, v in tr.best_model_state().items():
        assert torch.equal(v, start[k]), k


@pytest.mark.parametrize(
    ("epochs", "every", "budget_epochs", "want"),
    [
        (5, 2, 0, [0, 2, 4, 5]),
        (4, 4, 0, [0, 4]),
        (20, 4, 0, [0, 4, 8, 12, 16, 20]),
        (8, 4, 3, [0, 3]),
    ],
)
def test_selection_scores_every_nth_epoch_and_the_last(epochs, every, budget_epochs, want):
    # selection's cost is bounded by scoring fewer candidates, never by skipping the last
    # epoch, even when a step budget ends the run early (here exactly at an epoch's end)
    over = {"train.epochs": epochs, "train.select_every": every}
    cfg = _cfg(**over, **{"train.samples_per_image": 4, "train.batch_size": 8})
    per_epoch = 3  # 6 images x 4 samples / batch 8
    cfg = cfg.replace(**{"train.max_steps": budget_epochs * per_epoch})
    tr = ScaleTrainer(cfg, 16, build_scale_model(cfg, 16, None))
    hist = tr.fit(_images(), _images(2, seed=1))
    assert [int(h["steps"]) for h in hist][:1] == [per_epoch]
    assert [int(c["epoch"]) for c in tr.candidates] == want
    scored = [int(h["epoch"]) for h in hist if "selection_seconds" in h]
    assert scored == want[1:]
    assert tr.best_epoch in want


def test_ablation_trains_without_a_loss_and_without_its_head():
    cfg = _cfg(**{"train.losses": ("svdd", "cos", "kmeans"), "train.epochs": 1})
    model = build_scale_model(cfg, 16, None)
    assert model.head is None  # an unused head would break DDP (no gradient for it)
    tr = ScaleTrainer(cfg, 16, model)
    hist = tr.fit(_images(), _images(2, seed=1))
    assert "ssl" not in hist[0] and "val_ssl" not in hist[0] and "val_score" in hist[0]
    assert build_scale_model(_cfg(), 16, None).head is not None


def test_without_held_out_images_the_last_epoch_is_kept():
    cfg = _cfg(**{"train.epochs": 2})
    tr = ScaleTrainer(cfg, 16, build_scale_model(cfg, 16, None))
    tr.fit(_images(), None)
    assert tr.best_epoch == 2
    for k, v in tr.best_model_state().items():
        assert torch.equal(v, tr.core.state_dict()[k])


def test_resume_from_state_matches_an_uninterrupted_run_bit_for_bit():
    cfg = _cfg(**{"train.epochs": 3})
    imgs, val = _images(), _images(2, seed=1)
    full = ScaleTrainer(cfg, 16, build_scale_model(cfg, 16, None))
    full.fit(imgs, val)

    short = cfg.replace(**{"train.epochs": 2})
    first = ScaleTrainer(short, 16, build_scale_model(cfg, 16, None))
    first.fit(imgs, val)
    resumed = ScaleTrainer(cfg, 16, build_scale_model(cfg, 16, None))
    resumed.load_state_dict(first.state_dict())
    resumed.fit(imgs, val)
    assert resumed.epoch == 3
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for k, v in full.core.state_dict().items():
        assert torch.equal(v, resumed.core.state_dict()[k]), k
    assert resumed.best_epoch == full.best_epoch


def test_step_budget_stops_at_the_same_step_every_time():
    cfg = _cfg(**{"train.epochs": 50, "train.max_steps": 5})
    runs = []
    for _ in range(2):
        tr = ScaleTrainer(cfg, 16, build_scale_model(cfg, 16, None))
        hist = tr.fit(_images(), _images(2, seed=1))
        runs.append(tr)
    # 6 images × 8 samples / batch 16 = 3 steps per epoch: the budget ends epoch 2 early.
    assert [h["steps"] for h in hist] == [3, 5]
    assert hist[-1]["stopped_at_max_steps"] == 1.0 and hist[0]["stopped_at_max_steps"] == 0.0
    assert tr.steps == 5 and tr.epoch == 2
    for k, v in runs[0].core.state_dict().items():
        assert torch.equal(v, runs[1].core.state_dict()[k]), k
    summary = run_summary(hist, cfg)
    assert summary["stopped_by"] == "max_steps" and summary["steps"] == 5


def test_default_config_has_no_budget():
    assert MSPrayConfig().train.max_steps == 0
    assert not hasattr(MSPrayConfig().train, "max_minutes")


def test_the_smallest_scale_trains_the_shared_stem_and_the_others_keep_it_frozen():
    from mspray.model.backbone import random_stem_state
    from mspray.model.scales import STEM_LAYERS
    from mspray.pipeline.executor import train_scales

    cfg = _cfg(
        **{
            "model.scales": (32, 16),
            "model.strides": (4, 4),
            "train.epochs": 1,
            "train.selection": "last",
        }
    )
    models = train_scales(cfg, _images(), _images(2, seed=1), None)
    initial = random_stem_state(STEM_LAYERS, cfg.train.seed)
    for key, init in initial.items():
        k = key.removeprefix("features.")
        stem16 = models[16].encoder.stem().state_dict()[k]
        assert not torch.equal(stem16, init), key  # trained with scale 16
        assert torch.equal(models[32].encoder.stem().state_dict()[k], stem16), key
    # scale 32 trained the rest of its trunk and its head
    fresh = build_scale_model(cfg, 32, None).encoder.state_dict()
    rest = models[32].encoder.state_dict()
    assert not torch.equal(rest["head.0.weight"], fresh["head.0.weight"])
