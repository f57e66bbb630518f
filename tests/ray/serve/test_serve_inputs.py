"""Request-body checks of the Serve endpoint, without Ray: content types, limits, multipart."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from mspray.ray.serve import request as inputs
from mspray.ray.serve.request import BadInput


def _png(size=(8, 6), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def _status(fn, *args) -> int:
    with pytest.raises(BadInput) as e:
        fn(*args)
    return e.value.status


@pytest.mark.parametrize(
    ("ctype", "kind"),
    [
        ("image/png", "raw"),
        ("IMAGE/JPEG; q=1", "raw"),
        ("application/octet-stream", "raw"),
        (None, "raw"),
        ("multipart/form-data; boundary=x", "multipart"),
    ],
)
def test_accepted_content_types(ctype, kind):
    assert inputs.body_kind(ctype) == kind


@pytest.mark.parametrize("ctype", ["application/json", "text/plain", "video/mp4"])
def test_other_content_types_are_415(ctype):
    assert _status(inputs.body_kind, ctype) == 415


def test_declared_length():
    inputs.check_declared_length(None, 10)
    inputs.check_declared_length("10", 10)
    assert _status(inputs.check_declared_length, "11", 10) == 413
    assert _status(inputs.check_declared_length, "ten", 10) == 400


def test_read_limited_stops_past_the_limit():
    async def chunks(n):
        for _ in range(n):
            yield b"x" * 4

    assert asyncio.run(inputs.read_limited(chunks(3), 12)) == b"x" * 12
    with pytest.raises(BadInput) as e:
        asyncio.run(inputs.read_limited(chunks(4), 12))
    assert e.value.status == 413


def _form(parts: list[tuple[str, str | None, bytes]], boundary: str = "B0und") -> bytes:
    out = b""
    for name, filename, content in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_multipart_returns_the_file_field_bytes_exactly():
    png = _png()
    payload = png + b"\r\n--not-the-boundary\r\n"  # CRLFs inside the file survive
    body = _form([("note", None, b"hello"), ("upload", "part.png", payload)])
    data, name = inputs.multipart_file(body, "multipart/form-data; boundary=B0und")
    assert data == payload and name == "part.png"
    data, name = inputs.multipart_file(
        _form([("file", None, png)], "q"), 'multipart/form-data; boundary="q"'
    )
    assert data == png and name == "file"


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (_form([("note", None, b"hi")]), "multipart/form-data; boundary=B0und"),
        (_form([("file", "a.png", b"x")]), "multipart/form-data"),
        (b"garbage without parts", "multipart/form-data; boundary=B0und"),
        (b"--B0und\r\nno header end--B0und--", "multipart/form-data; boundary=B0und"),
    ],
)
def test_malformed_multipart_is_400(body, ctype):
    assert _status(inputs.multipart_file, body, ctype) == 400


def test_decode_maps_each_failure_to_its_status():
    arr = inputs.decode(_png((8, 6), "L"), "ok.png", 1000)
    assert arr.shape == (6, 8, 3) and arr.dtype == np.uint8
    png = _png((100, 100))
    assert _status(inputs.decode, b"", "e", 10**6) == 400
    assert _status(inputs.decode, b"not an image", "n", 10**6) == 422
    assert _status(inputs.decode, png[: len(png) // 2], "t", 10**6) == 422
    assert _status(inputs.decode, png, "big", 9999) == 413
    buf = io.BytesIO()
    Image.new("F", (4, 4)).save(buf, format="TIFF")
    assert _status(inputs.decode, buf.getvalue(), "f.tif", 10**6) == 415
