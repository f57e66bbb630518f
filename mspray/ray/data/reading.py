"""Reading and decoding inside the pipelines, where every bad file becomes an error message.

A batch job must never fail on its input: a missing, zero-byte, truncated, non-image or
oversized file gives an error string for that image and the rest of the batch goes on. Reads
are bounded (an oversized object is never downloaded whole) and overlap on a few threads, so
S3 latency hides behind the model of the previous batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from mspray import storage
from mspray.config import ScoreConfig
from mspray.data.images import ImageDecodeError, decode_image, to_tensor


def read_limited(uri: str, max_bytes: int) -> bytes:
    """The file's bytes; :class:`ImageDecodeError` when it is larger than ``max_bytes``
    (only ``max_bytes + 1`` bytes are ever transferred)."""
    fs, path = storage.filesystem(uri)  # S3 requests are retried by pyarrow's retry strategy
    try:
        with fs.open_input_stream(path) as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file") from None
    if len(data) > max_bytes:
        raise ImageDecodeError(f"{uri}: file is over the limit of {max_bytes} bytes")
    return data


def load_checked(uri: str, size: int, cfg: ScoreConfig) -> torch.Tensor:
    """Read, decode and resize one image like :func:`mspray.data.images.load_image`, with
    the byte and pixel limits of ``cfg``; raises on any bad input."""
    return to_tensor(
        decode_image(read_limited(uri, cfg.max_image_bytes), uri, cfg.max_image_pixels), size
    )


def error_text(uri: str, e: BaseException) -> str:
    """One line for the ``error`` column; decode errors already name the file."""
    msg = str(e)
    if isinstance(e, ImageDecodeError) or uri in msg:
        return msg
    return f"{uri}: {type(e).__name__}: {msg}"


@dataclass
class DecodedBatch:
    """One batch of inputs: the good images stacked, and an error per input (None = ok)."""

    uris: list[str]
    images: torch.Tensor  # G×3×S×S, G = number of good inputs, in input order
    errors: list[str | None]

    @property
    def ok(self) -> list[int]:
        """Positions (in ``uris``) of the good images, matching the rows of ``images``."""
        return [i for i, e in enumerate(self.errors) if e is None]


def _load_one(uri: str, size: int, cfg: ScoreConfig) -> torch.Tensor | str:
    try:
        return load_checked(uri, size, cfg)
    except Exception as e:  # any per-image failure is that image's error row
        return error_text(uri, e)


def _collect(uris: list[str], futures: list[Future], size: int) -> DecodedBatch:
    results = [f.result() for f in futures]
    good = [r for r in results if isinstance(r, torch.Tensor)]
    images = torch.stack(good) if good else torch.empty(0, 3, size, size)
    errors = [r if isinstance(r, str) else None for r in results]
    return DecodedBatch(uris, images, errors)


def iter_loaded(
    uris: list[str], batch_size: int, size: int, cfg: ScoreConfig, pool: ThreadPoolExecutor
) -> Iterator[DecodedBatch]:
    """Batches of ``uris`` loaded on ``pool``; the next batch loads while the caller works
    on the current one (at most two batches in memory)."""
    chunks = [uris[i : i + batch_size] for i in range(0, len(uris), batch_size)]

    def submit(chunk: list[str]) -> list[Future]:
        return [pool.submit(_load_one, u, size, cfg) for u in chunk]

    ahead = submit(chunks[0]) if chunks else []
    for k, chunk in enumerate(chunks):
        current = ahead
        ahead = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
        yield _collect(chunk, current, size)
