import pytest
import torch

from mspray.model.backbone import (
    PretrainedWeightsError,
    load_vgg16_state,
    vgg16_prefix,
)


def test_loads_weights_from_a_local_file_without_pickled_code(tmp_path):
    net = vgg16_prefix(31)
    state = {f"features.{k}": v for k, v in net.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    loaded = load_vgg16_state(str(path))
    assert set(loaded) == {k for k in state if k.startswith("features.")}
    assert torch.equal(loaded["features.28.weight"], state["features.28.weight"])


def test_missing_or_wrong_weights_raise_clear_errors(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="not found"):
        load_vgg16_state(str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1)}, bad)
    with pytest.raises(PretrainedWeightsError, match="features"):
        load_vgg16_state(str(bad))


def test_offline_without_cache_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MSPRAY_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(PretrainedWeightsError):
        load_vgg16_state(None)
