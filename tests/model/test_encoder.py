import pytest
import torch

from mspray.model.backbone import VGG16_CFG, init_prefix, vgg16_prefix
from mspray.model.encoder import AngleHead, PatchEncoder, network_stride


@pytest.mark.parametrize("p", [64, 32, 16])
def test_dense_grid_equals_each_patch_cropped_alone(p):
    torch.manual_seed(p)
    enc = PatchEncoder(p, 64).eval()
    x = torch.randn(2, 3, 96 + p, 80 + p)
    with torch.no_grad():
        grid = enc(x)  # B×D×h×w
        s = enc.stride
        assert grid.shape[-2:] == ((x.shape[2] - p) // s + 1, (x.shape[3] - p) // s + 1)
        ys, xs = torch.meshgrid(
            torch.arange(grid.shape[2]), torch.arange(grid.shape[3]), indexing="ij"
        )
        crops = torch.stack(
            [
                x[b, :, i * s : i * s + p, j * s : j * s + p]
                for b in range(2)
                for i, j in zip(ys.flatten(), xs.flatten(), strict=True)
            ]
        )
        alone = enc.embed_patches(crops).view(2, grid.shape[2], grid.shape[3], -1)
    err = (alone - grid.permute(0, 2, 3, 1)).abs().max().item()
    assert err < 1e-4, err


@pytest.mark.parametrize("p", [64, 32, 16])
def test_patch_maps_to_one_vector(p):
    enc = PatchEncoder(p, 32)
    assert enc(torch.randn(3, 3, p, p)).shape == (3, 32, 1, 1)
    assert network_stride(p) == enc.stride
    with pytest.raises(ValueError):
        enc(torch.randn(1, 3, p - 1, p))


def test_prefix_has_torchvision_vgg16_keys_and_loads_a_state():
    full = vgg16_prefix(len(VGG16_CFG) * 2)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in full) == 13
    state = {f"features.{k}": torch.randn_like(v) for k, v in full.state_dict().items()}
    enc = PatchEncoder(32, 64, vgg_state=state)
    assert torch.equal(enc.features[0].weight, state["features.0.weight"])
    assert torch.equal(enc.features[7].bias, state["features.7.bias"])
    prefix = vgg16_prefix(17)
    init_prefix(prefix, state)
    assert torch.equal(prefix[14].weight, state["features.14.weight"])


def test_angle_head_is_trainable_end_to_end():
    head = AngleHead(16)
    out = head(torch.randn(5, 16), torch.randn(5, 16))
    assert out.shape == (5, 12)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
