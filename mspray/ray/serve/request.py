"""One HTTP request body -> one decoded image, or a :class:`BadInput` with a 4xx status.

Checks run cheapest first, so a bad request costs little: content type, declared length,
the body read under a byte limit, then the image header (pixel count) before any pixel
is decoded. No Ray or web framework here, so it is easy to test.

=======================================  ======
bad input                                status
=======================================  ======
content type not image/*, octet-stream   415
or multipart/form-data
body (or declared length) over the limit 413
empty body / multipart without a file    400
not an image, truncated file             422
pixel count over the limit (bomb)        413
image mode we do not handle              415
=======================================  ======
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from email.message import Message

import numpy as np

from mspray.data.images import ImageDecodeError, decode_image

#: Content types accepted for POST /v1/predict (raw body, or a multipart file field).
ACCEPTED_TYPES = ("image/*", "application/octet-stream", "multipart/form-data")
#: HTTP status of each :attr:`ImageDecodeError.reason`.
DECODE_STATUS = {"empty": 400, "too_large": 413, "unsupported": 415, "corrupt": 422}


class BadInput(Exception):
    """A request the client must fix: ``status`` (4xx) and a message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def body_kind(content_type: str | None) -> str:
    """``"raw"`` or ``"multipart"`` for an accepted content type, else 415.

    A missing content type is taken as a raw body: some clients send none for binary data.
    """
    main = (content_type or "").split(";", 1)[0].strip().lower()
    if not main or main == "application/octet-stream" or main.startswith("image/"):
        return "raw"
    if main == "multipart/form-data":
        return "multipart"
    raise BadInput(
        415,
        f"unsupported content type {main!r}: send the image as the raw body "
        f"(image/* or application/octet-stream) or as a multipart/form-data file field",
    )


def check_declared_length(content_length: str | None, max_bytes: int) -> None:
    """Reject from the Content-Length header alone, before reading a byte of the body."""
    if content_length is None:
        return  # chunked upload: read_limited() enforces the limit while reading
    try:
        n = int(content_length)
    except ValueError:
        raise BadInput(400, f"invalid Content-Length {content_length!r}") from None
    if n > max_bytes:
        raise BadInput(413, f"body of {n} bytes is over the limit of {max_bytes} bytes")


async def read_limited(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The whole body, stopping as soon as it grows past ``max_bytes`` (413)."""
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise BadInput(413, f"body is over the limit of {max_bytes} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _header_params(name: str, value: str) -> Message:
    """A header parsed by the stdlib (quoting, RFC 2231), to read its parameters."""
    m = Message()
    m[name] = value
    return m


def multipart_file(body: bytes, content_type: str) -> tuple[bytes, str]:
    """The first file field of a multipart/form-data body: (bytes, filename).

    A small parser of our own, because FastAPI's form parsing needs the optional
    python-multipart package; the body is already in memory and size-checked.
    """
    boundary = _header_params("content-type", content_type).get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise BadInput(400, "multipart/form-data without a boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
    pieces = body.split(delimiter)
    if len(pieces) < 3:  # preamble, at least one part, closing "--"
        raise BadInput(400, "malformed multipart/form-data body")
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break  # closing delimiter
        head, sep, content = piece.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            raise BadInput(400, "malformed multipart/form-data part (no header end)")
        disposition = ""
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value.strip()
        if not disposition:
            continue
        params = _header_params("content-disposition", disposition)
        filename = params.get_filename()
        field = params.get_param("name", header="content-disposition")
        if filename is not None or field in ("file", "image"):
            return content.removesuffix(b"\r\n"), str(filename or field)
    raise BadInput(400, "multipart/form-data body has no file field (send it as 'file')")


def decode(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Decode to H×W×3 uint8; each :class:`ImageDecodeError` becomes its 4xx."""
    try:
        return decode_image(data, name, max_pixels)
    except ImageDecodeError as e:
        status = DECODE_STATUS.get(getattr(e, "reason", "corrupt"), 422)
        raise BadInput(status, str(e)) from None
