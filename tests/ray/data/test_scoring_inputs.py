"""Bounded reads and batch loading: every bad file is an error string, never an exception."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mspray.config import ScoreConfig
from mspray.data.images import ImageDecodeError, load_image
from mspray.ray.data.reading import iter_loaded, read_limited

LIMITS = ScoreConfig(max_image_bytes=100_000)


def test_read_limited_stops_at_the_limit(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"a" * 1000)
    assert read_limited(str(f), 1000) == b"a" * 1000
    with pytest.raises(ImageDecodeError, match="over the limit of 999 bytes"):
        read_limited(str(f), 999)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_limited(str(tmp_path / "missing.png"), 10)


def test_bad_inputs_become_errors_and_good_ones_match_load_image(tmp_path, bad_inputs, png_bytes):
    uris = []
    for name, data in bad_inputs.items():
        (tmp_path / name).write_bytes(data)
        uris.append(str(tmp_path / name))
    for i in range(3):
        (tmp_path / f"good{i}.png").write_bytes(png_bytes((50, 30), seed=10 + i))
        uris.insert(2 * i, str(tmp_path / f"good{i}.png"))
    uris.append(str(tmp_path / "vanished.png"))  # listed, then deleted before the read
    with ThreadPoolExecutor(3) as pool:
        batches = list(iter_loaded(uris, 4, 32, LIMITS, pool))
    assert [len(b.uris) for b in batches] == [4, 4, 1]
    errors = [e for b in batches for e in b.errors]
    by_name = dict(zip([u.rsplit("/", 1)[-1] for u in uris], errors, strict=True))
    assert all(by_name[f"good{i}.png"] is None for i in range(3))
    assert "empty file" in by_name["zero.png"]
    assert "cannot decode" in by_name["truncated.png"]
    assert "cannot decode" in by_name["not_an_image.jpg"]
    assert "decompression bomb" in by_name["bomb.png"]
    assert "over the limit" in by_name["huge.png"]
    assert "no such file" in by_name["vanished.png"]
    for name, err in by_name.items():
        assert err is None or name in err  # every message names its file
    # good images come out exactly as the core loads them, in input order
    good = torch.cat([b.images for b in batches])
    ref = torch.stack([load_image(str(tmp_path / f"good{i}.png"), 32) for i in range(3)])
    assert torch.equal(good, ref)
