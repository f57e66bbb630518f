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
    enc64 = PatchEncoder(64, 64, vgg_state=state)  # conv3_3 is its last prefix layer
    assert torch.equal(enc64.features[14].weight, state["features.14.weight"])


def test_angle_head_is_trainable_end_to_end():
    head = AngleHead(16)
    out = head(torch.randn(5, 16), torch.randn(5, 16))
    assert out.shape == (5, 12)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.mark.parametrize("p", [64, 32, 16])
def test_receptive_field_is_exactly_the_patch(p):
    """Each embedding of a dense grid depends on every border row/column of its patch and on
    nothing outside it (the 64-px encoder used to ignore its last 4 rows and columns)."""
    torch.manual_seed(p)
    enc = PatchEncoder(p, 32).eval()
    s = enc.stride
    side = p + 2 * s  # a 3×3 grid; the centre patch spans [s, s + p)
    x = torch.rand(1, 3, side, side)
    lo, hi = s, s + p - 1  # first and last row/column inside the centre patch
    variants = []
    for axis in (2, 3):  # rows, then columns
        for k in (lo - 1, lo, hi, hi + 1):
            y = x.clone()
            y.select(axis, k).copy_(torch.rand_like(y.select(axis, k)) * 4 - 2)
            variants.append((axis, k, y))
    with torch.no_grad():
        # One batch: the unchanged image is embedded by the same kernels as its variants.
        out = enc(torch.cat([x] + [v for _, _, v in variants]))[:, :, 1, 1]
    base, out = out[0], out[1:]
    # Same batch, same kernels: pixels outside the patch change nothing at all, while a
    # border row of a randomly initialised deep prefix moves the embedding only a little.
    size = base.abs().max().item()
    for (axis, k, _), e in zip(variants, out, strict=True):
        change = (e - base).abs().max().item()
        where = f"{'row' if axis == 2 else 'column'} {k} of a patch spanning [{lo}, {hi}]"
        if lo <= k <= hi:
            assert change > 1e-6 * size, f"changing {where} left the embedding unchanged ({change})"
        else:
            assert change <= 1e-7 * size, f"changing {where} changed the embedding by {change}"


@pytest.mark.parametrize("p", [64, 32, 16])
def test_map_spreads_a_patch_score_over_exactly_the_pixels_its_embedding_sees(p):
    """maps.patch_scores_to_map puts the score of grid cell (1, 1) on exactly the rows and
    columns whose pixels change that cell's embedding."""
    from mspray.maps import patch_scores_to_map

    torch.manual_seed(p)
    enc = PatchEncoder(p, 16).eval()
    s = enc.stride
    side = p + 2 * s
    x = torch.rand(1, 3, side, side)
    rows = x.repeat(side, 1, 1, 1)
    cols = x.repeat(side, 1, 1, 1)
    k = torch.arange(side)
    rows[k, :, k, :] = torch.rand(side, 3, side) * 4 - 2  # variant k: row k redrawn
    cols[k, :, :, k] = torch.rand(side, 3, side) * 4 - 2
    with torch.no_grad():
        e = enc(torch.cat([x, rows, cols]))[:, :, 1, 1]
    moved = (e[1:] - e[0]).abs().amax(1) > 0
    seen_rows, seen_cols = moved[:side], moved[side:]
    one_hot = torch.zeros(1, 3, 3)
    one_hot[0, 1, 1] = 1.0
    spread = patch_scores_to_map(one_hot, p, s, side)[0] > 0
    assert torch.equal(spread.any(1), seen_rows)
    assert torch.equal(spread.any(0), seen_cols)
    assert int(seen_rows.sum()) == p


def test_authors_choices_tanh_output_and_difference_angle_input():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48, 48) * 50  # large inputs: a linear output would leave [-1, 1]
    enc = PatchEncoder(16, 8, output_tanh=True)
    assert enc(x).abs().max() <= 1 and PatchEncoder(16, 8)(x).abs().max() > 1
    head = AngleHead(8, angle_input="diff")
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    assert head.net[0].in_features == 8  # reads h1 - h2 only
    assert torch.allclose(head(a, b), head(a + 3.0, b + 3.0))  # a shift of both cancels
    with pytest.raises(ValueError, match="angle_input"):
        AngleHead(8, angle_input="sum")


@pytest.mark.parametrize("patch", [64, 32, 16])
def test_a_strided_grid_equals_every_step_th_embedding_of_the_full_grid(patch):
    enc = PatchEncoder(patch).eval()
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(patch))
    with torch.no_grad():
        full = enc(x)
        for step in (2, 3):
            torch.testing.assert_close(enc(x, step=step), full[:, :, ::step, ::step])
