"""The fitting pipeline in process: every step recorded, stage one inside the train step."""

from __future__ import annotations

import torch

from mspray.data.datasets import train_paths
from mspray.model.backbone import random_stem_state
from mspray.model.scales import STEM_LAYERS
from mspray.pipeline.steps import STEPS, fit_detector


def test_stage_one_trains_the_trunk_before_the_scales_when_no_imagenet_weights(
    synthetic_root, tiny_cfg
):
    cfg = tiny_cfg.replace(
        **{
            "train.epochs": 0,
            "train.stage_one": True,
            "train.stage_one_steps": 2,
            "train.stage_one_batch": 4,
        }
    )
    uris = train_paths(f"mvtec:{synthetic_root}", "synthetic")
    det = fit_detector(cfg, uris)
    steps = det.meta["pipeline"]["steps"]
    assert [r["step"] for r in steps] == list(STEPS[:-1])
    assert steps[1]["stage_one"] is True
    assert det.meta["stage_one"] is not None
    # the encoders start from the trunk stage one trained, not the seeded random one
    initial = random_stem_state(STEM_LAYERS, cfg.train.seed)
    scale = min(det.scales)
    stem = det.model.encoder(scale).stem().state_dict()
    key = next(iter(initial)).removeprefix("features.")
    assert not torch.equal(stem[key], initial[next(iter(initial))])

    plain = fit_detector(cfg.replace(**{"train.stage_one": False}), uris)
    assert plain.meta["stage_one"] is None and "stage_one" not in plain.meta["pipeline"]["steps"][1]
