"""Stage one on Ray Train: two real gloo DDP workers train one trunk (no mocks)."""

from __future__ import annotations

import pytest
import torch

from mspray.config import tiny_config
from mspray.data.datasets import train_paths
from mspray.model.backbone import random_stem_state
from mspray.ray.train_stage_one import ray_stage_one
from mspray.train.stage_one import trunk_layers

pytestmark = pytest.mark.ray


def test_two_ddp_workers_train_one_trunk_from_the_given_one(ray_local, synthetic_root, tmp_path):
    cfg = tiny_config(
        **{"model.scales": (16,), "model.strides": (4,), "train.stage_one": True},
        **{"train.stage_one_steps": 2, "train.stage_one_batch": 4},
    )
    uris = train_paths(f"mvtec:{synthetic_root}", "synthetic")
    start = random_stem_state(trunk_layers(cfg), seed=5)
    trunk, summary = ray_stage_one(cfg, uris, start, workers=2, storage=str(tmp_path))
    assert summary["workers"] == 2 and summary["steps"] == 2
    assert summary["from"] == "given trunk"
    assert trunk.keys() == start.keys()
    assert not torch.equal(trunk["features.0.weight"], start["features.0.weight"])
