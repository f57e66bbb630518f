"""``mspray evaluate --ray``: the same metrics JSON as the core's evaluation."""

from __future__ import annotations

import json
import os

import pytest

from mspray.artifacts.bundle import load_bundle
from mspray.data.datasets import test_samples
from mspray.evaluation.evaluate import evaluate

pytestmark = pytest.mark.ray


def test_ray_evaluate_matches_core_metrics_json(ray_local, tiny_bundle, tmp_path):
    from mspray.cli import main

    bundle, spec = tiny_bundle
    out = tmp_path / "metrics.json"
    maps = tmp_path / "maps"
    args = ["-q", "evaluate", "--bundle", bundle, "--data", spec, "--category", "synthetic",
            "--json", str(out), "--maps", str(maps), "--ray", "--workers", "2"]  # fmt: skip
    assert main(args) == 0
    got = json.loads(out.read_text())
    samples = test_samples(spec, "synthetic")
    ref = evaluate(load_bundle(bundle), samples)
    assert set(got) == set(ref)
    assert got["n_images"] == len(samples) and got["pixel_auroc"] is not None
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "f1_max", "threshold"):
        assert got[key] == pytest.approx(ref[key], rel=1e-4), key
    assert got["scale_image_auroc"] == pytest.approx(ref["scale_image_auroc"], rel=1e-4)
    assert got["at_threshold"] == ref["at_threshold"]
    assert got["model_version"] == ref["model_version"]
    assert got["seconds_per_image"] > 0
    assert len(os.listdir(maps)) == len(samples)  # the core's overlay panels, one per image
