"""The detector on CUDA: fp16/bf16 autocast scores close to fp32, search on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mspray.config import MSPrayConfig
from mspray.detector import Detector, resolve_precision, resolve_search_precision
from mspray.model.multiscale import MultiScaleEncoder


@pytest.fixture(scope="module")
def detectors() -> dict[str, Detector]:
    cfg = MSPrayConfig().replace(
        **{"model.image_size": 128, "model.pretrained": False, "score.precision": "fp32"}
    )
    torch.manual_seed(0)
    model = MultiScaleEncoder(cfg)
    g = torch.Generator().manual_seed(1)
    train = torch.rand(8, 3, 128, 128, generator=g)
    base = Detector(cfg, model, device="cuda")
    base.build_banks(train)
    out = {}
    for p in ("fp32", "fp16", "bf16"):
        c = cfg.replace(**{"score.precision": p})
        out[p] = Detector(c, model, base.banks, device="cuda")
    return out


def test_auto_precisions_on_cuda() -> None:
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda) == "fp16"
    assert resolve_search_precision("auto", cuda) == "fp16"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_maps_close_to_fp32(detectors: dict, precision: str) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 3, 128, 128, generator=g)
    x[3:, :, 40:70, 40:70] = 1.0  # a bright square: an anomaly
    ref = detectors["fp32"].predict(x)
    got = detectors[precision].predict(x)
    rel = (got.maps - ref.maps).abs().mean() / ref.maps.abs().mean()
    assert rel < (0.02 if precision == "fp16" else 0.05)
    assert (
        np.argsort(got.image_scores.numpy()).tolist()[-3:]
        == np.argsort(ref.image_scores.numpy()).tolist()[-3:]
    )


def test_search_runs_on_the_gpu(detectors: dict) -> None:
    det = detectors["fp16"]
    q = torch.randn(100, 64, device="cuda")
    d = det.search(det.banks[det.scales[0]], q)
    assert d.is_cuda and d.shape == (100,)
