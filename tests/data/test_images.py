"""Image decoding (modes, corrupt input, bombs) and loading into tensors."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mspray import storage
from mspray.data.images import (
    ImageDecodeError,
    decode_image,
    load_image,
    load_images,
    load_mask,
    to_tensor,
)


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _noise(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(side: int = 20000) -> bytes:
    """A real, valid 1-bit PNG of side×side black pixels (4e8 pixels) in ~50 kB."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def test_rgb_round_trip_is_exact():
    a = _noise()
    out = decode_image(_encode(Image.fromarray(a)))
    assert out.dtype == np.uint8 and out.shape == (48, 40, 3)
    np.testing.assert_array_equal(out, a)


def test_grayscale_becomes_three_equal_channels():
    g = _noise()[:, :, 0]
    out = decode_image(_encode(Image.fromarray(g, "L")))
    assert out.shape == (48, 40, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g)


def test_rgba_drops_alpha():
    a = np.dstack([_noise(), np.zeros((48, 40), np.uint8)])  # fully transparent
    out = decode_image(_encode(Image.fromarray(a, "RGBA")))
    np.testing.assert_array_equal(out, a[:, :, :3])


def test_16bit_png_is_scaled_to_8bit():
    a16 = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    data = _encode(Image.fromarray(a16))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    assert out.dtype == np.uint8 and out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    np.testing.assert_allclose(out[:, :, 1].astype(float), a16 / 257.0, atol=0.51)


def test_palette_one_bit_and_cmyk():
    pal = Image.fromarray(_noise()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out = decode_image(_encode(pal))
    np.testing.assert_array_equal(out, np.asarray(pal.convert("RGB")))
    bits = Image.fromarray((_noise()[:, :, 0] > 127).astype(np.uint8) * 255).convert("1")
    out = decode_image(_encode(bits))
    assert set(np.unique(out)) <= {0, 255} and out.shape == (48, 40, 3)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(_encode(cmyk, "JPEG"))
    assert out[4, 4, 0] > 200 and out[4, 4, 1] < 60 and out[4, 4, 2] < 60


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(np.random.default_rng(1).bytes(4096), id="random"),
        pytest.param(b"\x89PNG\r\n\x1a\n", id="png-signature-only"),
        pytest.param(_encode(Image.fromarray(_noise(64, 64)))[:-900], id="truncated-png"),
        pytest.param(_encode(Image.fromarray(_noise(64, 64)), "JPEG")[:1500], id="truncated-jpeg"),
        pytest.param(b"GIF89a" + b"\x00" * 20, id="bad-gif"),
    ],
)
def test_bad_bytes_raise_decode_error_naming_the_file(data):
    with pytest.raises(ImageDecodeError, match="bad-file.png"):
        decode_image(data, name="s3://bucket/bad-file.png")


def test_decompression_bombs_are_rejected_before_decoding():
    # 8000² = 6.4e7 pixels: over our 4e7 default, under PIL's own guard (8.9e7)
    bomb = _png_bomb(8000)
    assert len(bomb) < 50_000
    with pytest.raises(ImageDecodeError, match=r"bomb\.png: 8000x8000 .*decompression bomb"):
        decode_image(bomb, name="bomb.png")
    # 20000² = 4e8 pixels: PIL's own guard fires in Image.open, still an ImageDecodeError
    huge = _png_bomb(20000)
    for limit in (40_000_000, 10**12):
        with pytest.raises(ImageDecodeError, match=r"huge\.png: .*decompression bomb"):
            decode_image(huge, name="huge.png", max_pixels=limit)
    small = _encode(Image.fromarray(_noise(20, 20)))
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(small, name="x.png", max_pixels=399)
    assert decode_image(small, max_pixels=400).shape == (20, 20, 3)


def test_unsupported_mode_is_a_decode_error():
    data = _encode(Image.fromarray(np.ones((8, 8), np.float32)), "TIFF")
    with pytest.raises(ImageDecodeError, match="f.tif.*mode 'F'"):
        decode_image(data, name="f.tif")


def test_to_tensor_range_shape_and_resize():
    a = _noise(50, 70)
    t = to_tensor(a, 50)
    assert t.shape == (3, 50, 50) and t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    same = to_tensor(_noise(32, 32), 32)
    torch.testing.assert_close(same, torch.from_numpy(_noise(32, 32)).permute(2, 0, 1) / 255.0)
    flat = to_tensor(np.full((40, 60, 3), 200, np.uint8), 16)
    torch.testing.assert_close(flat, torch.full((3, 16, 16), 200 / 255.0))


def test_load_image_names_missing_and_corrupt_files(tmp_path):
    good = str(tmp_path / "good.png")
    storage.write_bytes(good, _encode(Image.fromarray(_noise())))
    assert load_image(good, 32).shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(str(tmp_path / "missing.png"), 32)
    bad = str(tmp_path / "corrupt.jpg")
    storage.write_bytes(bad, b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ImageDecodeError, match=str(bad)):
        load_image(bad, 32)


def test_load_mask_binarises_and_resizes(tmp_path):
    assert torch.equal(load_mask(None, 16), torch.zeros(16, 16, dtype=torch.uint8))
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 32:64] = 255
    m[0, 0] = 1  # any nonzero value is a defect
    uri = str(tmp_path / "m_mask.png")
    storage.write_bytes(uri, _encode(Image.fromarray(m)))
    full = load_mask(uri, 64)
    assert full.dtype == torch.uint8 and int(full.sum()) == 32 * 32 + 1
    half = load_mask(uri, 32)
    assert set(half.unique().tolist()) == {0, 1}
    assert half[8:24, 16:32].all() and int(half.sum()) == 16 * 16


def test_load_images_keeps_order_local_and_s3(tmp_path, s3_bucket):
    arrays = [np.full((20, 30, 3), v, np.uint8) for v in (10, 120, 250)]
    local = [str(tmp_path / f"{i}.png") for i in range(3)]
    remote = [storage.join(s3_bucket, "imgs", f"{i}.png") for i in range(3)]
    for a, lu, ru in zip(arrays, local, remote, strict=True):
        storage.write_bytes(lu, _encode(Image.fromarray(a)))
        storage.write_bytes(ru, _encode(Image.fromarray(a)))
    for uris in (local, remote):
        batch = load_images(uris, 8)
        assert batch.shape == (3, 3, 8, 8)
        torch.testing.assert_close(
            batch.mean(dim=(1, 2, 3)), torch.tensor([10.0, 120.0, 250.0]) / 255
        )
    assert load_images([], 8).shape == (0, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_images(local + [os.path.join(tmp_path, "gone.png")], 8)
