"""One HTTP request -> one image's bytes, or a :class:`BadInput` with a 4xx status.

Checks run cheapest first, so a bad request costs little: content type, declared length,
the body read under a byte limit, then the image header (pixel count) before any pixel
is decoded. Multipart forms are parsed by Starlette (python-multipart) over the same
byte-limited stream, so neither kind of body is ever read past the limit.

=======================================  ======
bad input                                status
=======================================  ======
content type not image/*, octet-stream   415
or multipart/form-data
body (or declared length) over the limit 413
empty body / malformed form / no file    400
not an image, truncated file             422
pixel count over the limit (bomb)        413
image mode we do not handle              415
=======================================  ======
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import Message, Receive

from mspray.data.images import ImageDecodeError, decode_image

#: Content types accepted for POST /v1/predict (raw body, or a multipart file field).
ACCEPTED_TYPES = ("image/*", "application/octet-stream", "multipart/form-data")
#: The multipart field that carries the image (``curl -F file=@img.png``).
FILE_FIELD = "file"
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
        f"(image/* or application/octet-stream) or as a multipart/form-data file field "
        f"{FILE_FIELD!r}",
    )


def check_declared_length(content_length: str | None, max_bytes: int) -> None:
    """Reject from the Content-Length header alone, before reading a byte of the body."""
    if content_length is None:
        return  # chunked upload: the limited stream enforces the limit while reading
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
            raise _over_limit(max_bytes)
        parts.append(chunk)
    return b"".join(parts)


def limited_receive(receive: Receive, max_bytes: int) -> Receive:
    """An ASGI ``receive`` that raises 413 once the body grows past ``max_bytes``: whatever
    reads the request through it (Starlette's form parser) stops there."""
    total = 0

    async def wrapped() -> Message:
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > max_bytes:
                raise _over_limit(max_bytes)
        return message

    return wrapped


async def multipart_file(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """The uploaded file of a multipart/form-data request: (bytes, filename).

    Field :data:`FILE_FIELD`, or the form's only file under another name. At most one file
    is accepted; the whole body is capped at ``max_bytes``.
    """
    limited = Request(request.scope, limited_receive(request.receive, max_bytes))
    try:
        form = await limited.form(max_files=1, max_fields=16)
    except MultiPartException as e:
        raise BadInput(400, f"malformed multipart/form-data: {e.message}") from None
    except HTTPException as e:  # Starlette's wrapping of MultiPartException inside an app
        raise BadInput(400, f"malformed multipart/form-data: {e.detail}") from None
    try:
        upload = form.get(FILE_FIELD)
        if not isinstance(upload, UploadFile):
            upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
        if upload is None:
            raise BadInput(
                400, f"multipart/form-data body has no file field (send it as {FILE_FIELD!r})"
            )
        return await upload.read(), upload.filename or FILE_FIELD
    finally:
        await form.close()


async def read_image(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """The image bytes of a predict request (raw body or multipart file) and a name for
    error messages; every check before decoding."""
    kind = body_kind(request.headers.get("content-type"))
    check_declared_length(request.headers.get("content-length"), max_bytes)
    if kind == "multipart":
        return await multipart_file(request, max_bytes)
    return await read_limited(request.stream(), max_bytes), "request body"


def decode(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Decode to H×W×3 uint8; each :class:`ImageDecodeError` becomes its 4xx."""
    try:
        return decode_image(data, name, max_pixels)
    except ImageDecodeError as e:
        status = DECODE_STATUS.get(getattr(e, "reason", "corrupt"), 422)
        raise BadInput(status, str(e)) from None


def _over_limit(max_bytes: int) -> BadInput:
    return BadInput(413, f"body is over the limit of {max_bytes} bytes")
