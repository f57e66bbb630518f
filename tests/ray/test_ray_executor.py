"""One pipeline, two executors: in process and on Ray, the same steps in the same order.

The steps are written once (:mod:`mspray.pipeline.steps`); these tests run them with the
in-process executor and with :class:`mspray.ray.executor.RayExecutor` on the same tiny set
and compare what each step did.
"""

from __future__ import annotations

import pytest
import torch

import mspray.pipeline.steps as steps
from mspray.artifacts.bundle import load_bundle, read_meta
from mspray.config import PoolConfig
from mspray.data.datasets import train_paths
from mspray.model.backbone import vgg16_prefix
from mspray.pipeline.steps import STEPS, fit_detector
from mspray.ray.executor import RayExecutor
from mspray.ray.train import ray_scale_trainer

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A VGG16 weight file in torchvision's layout (random values: no download here)."""
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in vgg16_prefix(31).state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save(state, path)
    return str(path)


def _ray(tmp_path) -> RayExecutor:
    trainer = ray_scale_trainer(storage=str(tmp_path / "runs"))
    return RayExecutor(pool=PoolConfig(workers=1), trainer=trainer)


def _records(out: str) -> list[dict]:
    """The step records of a saved bundle, without their timings."""
    pipeline = read_meta(out)["pipeline"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in pipeline["steps"]]


def test_both_executors_run_the_same_steps_and_the_fused_check(
    ray_local, synthetic_root, tiny_cfg, weights, tmp_path, monkeypatch
):
    loads = []
    load = steps.load_vgg16_state
    monkeypatch.setattr(steps, "load_vgg16_state", lambda p: loads.append(p) or load(p))
    cfg = tiny_cfg.replace(
        **{"model.pretrained": True, "model.weights_path": weights, "train.workers": 1}
    )
    uris = train_paths(f"mvtec:{synthetic_root}", "synthetic")

    fit_detector(cfg, uris, out=str(tmp_path / "local"))
    assert loads == [weights]
    fit_detector(cfg, uris, out=str(tmp_path / "ray"), executor=_ray(tmp_path))
    # once per fit: the Ray workers get the weights the split step loaded
    assert loads == [weights, weights]

    local, on_ray = _records(str(tmp_path / "local")), _records(str(tmp_path / "ray"))
    assert [r["step"] for r in local] == [r["step"] for r in on_ray] == list(STEPS[:-1])
    assert read_meta(str(tmp_path / "ray"))["pipeline"]["executor"] == "ray"
    by_step = {r["step"]: (r, q) for r, q in zip(local, on_ray, strict=True)}
    for name in ("split", "train", "embed"):
        assert by_step[name][0] == by_step[name][1], name
    assert by_step["split"][0]["pretrained"] is True
    # the fused check ran on Ray too (it never did under --workers before)
    for r in by_step["select"]:
        assert r["kept"] in ("selected", "untrained") and "skipped" not in r
    meta = read_meta(str(tmp_path / "ray"))
    assert meta["selection"]["choice"] == by_step["select"][1]["kept"]
    assert set(meta["selection"]["fused"]) == {"selected", "untrained"}
    assert by_step["calibrate"][0]["source"] == by_step["calibrate"][1]["source"] == "crossfit"
    bank_rows = [r["bank_rows"] for r in by_step["coreset"]]
    assert bank_rows[0] == bank_rows[1]


def test_without_held_out_images_both_executors_calibrate_on_the_bank(
    ray_local, synthetic_root, tiny_cfg, tmp_path
):
    # nothing held out and no cross-fitting: the only normal images are the bank's
    cfg = tiny_cfg.replace(
        **{
            "train.epochs": 0,
            "train.val_fraction": 0.0,
            "score.calibration": "holdout",
            "train.workers": 1,
        }
    )
    uris = train_paths(f"mvtec:{synthetic_root}", "synthetic")
    local = fit_detector(cfg, uris, out=str(tmp_path / "local"))
    fit_detector(cfg, uris, out=str(tmp_path / "ray"), executor=_ray(tmp_path))
    on_ray = load_bundle(str(tmp_path / "ray"))  # `latest`: the complete version
    for det in (local, on_ray):
        assert det.meta["calibration"]["source"] == "bank"
        assert det.meta["calibration"]["n"] == len(uris)
    assert on_ray.threshold == pytest.approx(local.threshold, rel=1e-4)
    assert [r["source"] for r in _records(str(tmp_path / "ray")) if r["step"] == "calibrate"] == [
        "bank"
    ]
