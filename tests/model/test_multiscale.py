"""The encoders' shared stem: computed once for all scales, never shared by mistake."""

import torch

from mspray.config import tiny_config
from mspray.model.multiscale import MultiScaleEncoder, normalize

SCALES = {"model.image_size": 64, "model.scales": (64, 32, 16), "model.strides": (8, 4, 4)}


def _stem_runs(model: MultiScaleEncoder) -> list[int]:
    """Calls of each scale's first stem convolution, recorded by forward hooks."""
    calls: list[int] = []
    for s in model.cfg.model.scales:
        model.encoder(s).features[0].register_forward_hook(lambda *a, s=s: calls.append(s))
    return calls


def test_shared_stem_runs_once_and_gives_each_encoders_own_grid():
    model = MultiScaleEncoder(tiny_config(**SCALES)).eval()
    images = torch.rand(2, 3, 64, 64)
    calls = _stem_runs(model)
    grids = model.embed_scales(images, {64: 8, 32: 4, 16: 4})
    assert len(calls) == 1
    for s, stride in ((64, 8), (32, 4), (16, 4)):
        alone = model.encoder(s)(normalize(images)).permute(0, 2, 3, 1)
        torch.testing.assert_close(grids[s], alone[:, :: stride // model.encoder(s).stride])


def test_encoders_with_their_own_stems_run_each_one():
    model = MultiScaleEncoder(tiny_config(**SCALES, **{"model.shared_stem": False})).eval()
    assert model.shared_stem((64, 32, 16)) is None
    calls = _stem_runs(model)
    model.embed_scales(torch.rand(1, 3, 64, 64), {64: 8, 32: 4, 16: 4})
    assert sorted(calls) == [16, 32, 64]


def test_a_stem_changed_in_place_is_no_longer_shared():
    model = MultiScaleEncoder(tiny_config(**SCALES))
    assert model.shared_stem((32, 16)) is not None
    with torch.no_grad():
        model.encoder(32).features[2].weight[0, 0, 0, 0] += 1e-3
    assert model.shared_stem((32, 16)) is None
    assert model.shared_stem((64, 16)) is not None
    calls = _stem_runs(model)
    model.embed_scales(torch.rand(1, 3, 64, 64), {32: 4, 16: 4})
    assert sorted(calls) == [16, 32]
