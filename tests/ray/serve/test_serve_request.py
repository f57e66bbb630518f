"""Request-body checks of the Serve endpoint, without Ray: content types, limits, multipart.

Requests are real Starlette ``Request`` objects over an ASGI ``receive`` that hands out the
body in chunks, as the proxy does; multipart bodies are parsed by Starlette itself.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image
from starlette.requests import Request

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


def _request(body: bytes, ctype: str | None, chunk: int = 1000, declare: bool = True):
    """A POST request whose body arrives in ``chunk``-byte messages; ``declare=False``
    leaves out Content-Length (a chunked upload). Also returns the bytes handed out."""
    headers = [] if ctype is None else [(b"content-type", ctype.encode())]
    if declare:
        headers.append((b"content-length", str(len(body)).encode()))
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    sent = []

    async def receive():
        piece = pieces[len(sent)]
        sent.append(len(piece))
        return {"type": "http.request", "body": piece, "more_body": len(sent) < len(pieces)}

    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "headers": headers}
    return Request(scope, receive), sent


def _read(body: bytes, ctype: str | None, max_bytes: int = 10**6, **kw) -> tuple[bytes, str]:
    request, _ = _request(body, ctype, **kw)
    return asyncio.run(inputs.read_image(request, max_bytes))


def _read_status(body: bytes, ctype: str | None, max_bytes: int = 10**6, **kw) -> BadInput:
    with pytest.raises(BadInput) as e:
        _read(body, ctype, max_bytes, **kw)
    return e.value


def _form(parts: list[tuple[str, str | None, bytes]], boundary: str = "B0und") -> bytes:
    out = b""
    for name, filename, content in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


FORM = "multipart/form-data; boundary=B0und"


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
    assert _read_status(_png(), ctype).status == 415


def test_declared_length():
    inputs.check_declared_length(None, 10)
    inputs.check_declared_length("10", 10)
    assert _status(inputs.check_declared_length, "11", 10) == 413
    assert _status(inputs.check_declared_length, "ten", 10) == 400


def test_raw_body_is_returned_exactly():
    png = _png()
    assert _read(png, "image/png", chunk=7) == (png, "request body")
    assert _read(png, None, declare=False) == (png, "request body")


def test_raw_body_over_the_limit_is_413_without_reading_it():
    body = b"\0" * 10_000
    # declared: rejected from the header, not one body message read
    request, sent = _request(body, "image/png", chunk=1000)
    with pytest.raises(BadInput) as e:
        asyncio.run(inputs.read_image(request, 2500))
    assert e.value.status == 413 and sent == []
    # chunked (no Content-Length): reading stops at the first chunk past the limit
    request, sent = _request(body, "image/png", chunk=1000, declare=False)
    with pytest.raises(BadInput) as e:
        asyncio.run(inputs.read_image(request, 2500))
    assert e.value.status == 413 and len(sent) == 3


def test_multipart_returns_the_file_field_bytes_exactly():
    png = _png()
    payload = png + b"\r\n--not-the-boundary\r\n"  # CRLFs inside the file survive
    body = _form([("note", None, b"hello"), ("file", "part.png", payload)])
    assert _read(body, FORM, chunk=13) == (payload, "part.png")
    # a single file under another field name is taken too (curl -F image=@x.png)
    body = _form([("image", "other.png", png)], "q")
    assert _read(body, 'multipart/form-data; boundary="q"') == (png, "other.png")


def test_multipart_over_the_limit_is_413_while_parsing():
    body = _form([("file", "big.png", b"\0" * 10_000)])
    request, sent = _request(body, FORM, chunk=1000, declare=False)
    with pytest.raises(BadInput) as e:
        asyncio.run(inputs.read_image(request, 2500))
    assert e.value.status == 413 and len(sent) == 3
    assert _read_status(body, FORM, 2500).status == 413  # declared length


@pytest.mark.parametrize(
    ("body", "ctype", "fragment"),
    [
        (_form([("note", None, b"hi")]), FORM, "no file field"),
        (_form([("file", "a.png", b"x")]), "multipart/form-data", "boundary"),
        (b"garbage without parts", FORM, "multipart"),
        (
            _form([("file", "a.png", b"x"), ("file2", "b.png", b"y")]),
            FORM,
            "files",
        ),
    ],
)
def test_malformed_multipart_is_400(body, ctype, fragment):
    bad = _read_status(body, ctype)
    assert bad.status == 400 and fragment in bad.message


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
