"""Reading and decoding inside the pipelines: bad files become error messages, transient
faults are retried and then raised.

A batch job must never fail on its input: a missing, zero-byte, truncated, non-image or
oversized file gives an error string for that image and the rest of the batch goes on
(:data:`BAD_INPUT`). Anything else (S3 throttling, timeouts, 5xx, a reset connection) says
nothing about the image: after the S3 client's own retries, the read is retried
:data:`READ_ATTEMPTS` times with backoff and then :class:`TransientError` is raised, so the
caller fails the work unit and a rerun tries again, instead of recording a good image as bad.
Reads are bounded (an oversized object is never downloaded whole) and overlap on a few
threads, so S3 latency hides behind decoding.

:func:`decode_units` is the CPU stage of batch scoring: it turns one work unit (a list of
paths) into one row holding the unit's decoded images as uint8 (a quarter of float32 in the
object store and on the network), for the model actors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from mspray import storage
from mspray.config import ScoreConfig
from mspray.data.images import ImageDecodeError, decode_image, to_tensor

log = logging.getLogger(__name__)

#: Failures that are the file's own (empty, corrupt, truncated, unsupported, too large, not
#: found): an error row, never retried. Everything else is transient or environmental.
BAD_INPUT: tuple[type[BaseException], ...] = (ImageDecodeError, FileNotFoundError)
#: Memory per reader thread of a decode task: one large source image (8 MP) decoded to RGB
#: and converted to float (15 bytes a pixel) before it is resized.
SOURCE_IMAGE_BYTES = 8_000_000 * 15
#: Attempts per image read on other errors (each after the S3 client's own retries), and
#: the first backoff in seconds (doubling).
READ_ATTEMPTS = 3
READ_BACKOFF_S = 0.5


class TransientError(RuntimeError):
    """An I/O or model failure that outlived its retries: it fails the work unit (no part is
    written), so a rerun scores the unit again; it never becomes an error row."""


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
    images: torch.Tensor  # G×3×S×S in [0, 1] (uint8: 0..255), G good inputs, in input order
    errors: list[str | None]

    @property
    def ok(self) -> list[int]:
        """Positions (in ``uris``) of the good images, matching the rows of ``images``."""
        return [i for i, e in enumerate(self.errors) if e is None]

    def chunks(self, n: int) -> Iterator[DecodedBatch]:
        """Consecutive sub-batches of at most ``n`` inputs (forward passes of bounded size)."""
        start = 0  # row of ``images`` where the next chunk's good images begin
        for i in range(0, len(self.uris), n):
            errors = self.errors[i : i + n]
            good = sum(e is None for e in errors)
            yield DecodedBatch(self.uris[i : i + n], self.images[start : start + good], errors)
            start += good


def load_or_error(
    uri: str, size: int, cfg: ScoreConfig, attempts: int = READ_ATTEMPTS
) -> torch.Tensor | str:
    """The image, or the error text of a bad file (:data:`BAD_INPUT`); other failures are
    retried with exponential backoff, then raised as :class:`TransientError`."""
    for attempt in range(attempts):
        try:
            return load_checked(uri, size, cfg)
        except BAD_INPUT as e:
            return error_text(uri, e)
        except Exception as e:
            if attempt + 1 == attempts:
                raise TransientError(
                    f"{error_text(uri, e)} (still failing after {attempts} attempts)"
                ) from e
            delay = READ_BACKOFF_S * 2**attempt
            log.warning("%s; retrying in %.1fs", error_text(uri, e), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


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
        return [pool.submit(load_or_error, u, size, cfg) for u in chunk]

    ahead = submit(chunks[0]) if chunks else []
    for k, chunk in enumerate(chunks):
        current = ahead
        ahead = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
        yield _collect(chunk, current, size)


def unsafe_key_error(uri: str, input_root: str) -> str | None:
    """The error row text for an input whose key, below the input prefix, has a ``.``,
    ``..`` or empty path segment; None for a normal key.

    S3 keys are plain strings, so ``in/../x.png`` can exist, and clients (pyarrow among
    them) normalise it while reading: the run would score another object than the one
    listed, and its heatmap path would leave the output folder. Such keys are never read.
    """
    path = uri.replace("\\", "/")  # local Windows paths: compare with / separators
    prefix = input_root.replace("\\", "/").rstrip("/") + "/"
    if not path.startswith(prefix):
        return f"{uri}: rejected: not under the input prefix {input_root}"
    segments = path[len(prefix) :].split("/")
    bad = [s for s in segments if s in ("", ".", "..")]
    if bad:
        shown = "empty" if bad[0] == "" else repr(bad[0])
        return f"{uri}: rejected: the key has a {shown} path segment (never followed)"
    return None


#: Columns of a decoded unit (the output of :func:`decode_units`).
UNIT_SCHEMA = pa.schema(
    [
        ("paths", pa.list_(pa.string())),
        ("errors", pa.list_(pa.string())),  # null where the image is good
        ("images", pa.large_binary()),  # the good images, G×3×S×S uint8, C order
        ("failure", pa.string()),  # set when the unit could not be read (transient)
        ("decoder", pa.string()),  # Ray node id of the task that decoded it
        ("model", pa.string()),  # the unit's bundle name in a multi-model run (else null)
        ("seconds", pa.float64()),  # wall time the decode task spent on the unit
    ]
)


def decode_unit(
    paths: list[str],
    size: int,
    cfg: ScoreConfig,
    pool: ThreadPoolExecutor,
    rejected: dict[str, str] | None = None,
) -> dict:
    """One work unit read and decoded on ``pool``: a row of :data:`UNIT_SCHEMA`. A transient
    failure (see :func:`load_or_error`) gives a row with ``failure`` set and no images.
    ``rejected`` paths are never read: their error is given."""
    rejected = rejected or {}

    def load(uri: str) -> torch.Tensor | str:
        if uri in rejected:
            return rejected[uri]
        image = load_or_error(uri, size, cfg)
        # uint8 on the reader thread: the unit never holds its images as float
        return to_uint8(image) if isinstance(image, torch.Tensor) else image

    try:
        results = list(pool.map(load, paths))
    except TransientError as e:
        return {"paths": paths, "errors": [None] * len(paths), "images": b"", "failure": str(e)}
    good = [r.numpy() for r in results if isinstance(r, torch.Tensor)]
    images = np.stack(good) if good else np.empty((0, 3, size, size), np.uint8)
    return {
        "paths": paths,
        "errors": [r if isinstance(r, str) else None for r in results],
        "images": np.ascontiguousarray(images, np.uint8).tobytes(),
        "failure": None,
    }


def decode_memory(unit: int, size: int, io_threads: int) -> int:
    """Bytes a decode task reserves: its unit as uint8 four times over (the images, their
    stack, its bytes and the Arrow row) and, per reader thread, a source image of up to
    :data:`SOURCE_IMAGE_BYTES` decoded with its float copy and resize."""
    return 4 * unit * 3 * size * size + io_threads * SOURCE_IMAGE_BYTES


def decode_units(
    batch: pa.Table, size: int, cfg_json: str, io_threads: int, input_root: str
) -> pa.Table:
    """Ray Data task (CPU): rows with a ``paths`` list (and, in a multi-model run, the
    ``model`` and its image ``size``; size 0: a unit of no model, not read) -> decoded units
    (:data:`UNIT_SCHEMA`). Reads of one unit overlap on ``io_threads`` threads (S3 latency);
    decoding is bounded by ``cfg.max_image_bytes`` / ``cfg.max_image_pixels``; keys with a
    ``.``/``..``/empty segment below ``input_root`` are never read."""
    import ray

    cfg = ScoreConfig.model_validate_json(cfg_json)
    node = ray.get_runtime_context().get_node_id()
    torch.set_num_threads(1)  # one resize per thread; the task's CPUs are its threads
    rows = []
    with ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="mspray-read") as pool:
        for unit in batch.to_pylist():
            t0 = time.perf_counter()
            paths, model, unit_size = unit["paths"], unit.get("model"), unit.get("size", size)
            if unit_size == 0:  # routed to no model: the scorer writes its error rows
                row = {"paths": paths, "errors": [None] * len(paths), "images": b""}
                row["failure"] = None
            else:
                rejected = {p: e for p in paths if (e := unsafe_key_error(p, input_root))}
                row = decode_unit(paths, unit_size or size, cfg, pool, rejected)
            row["seconds"] = time.perf_counter() - t0
            rows.append({**row, "decoder": node, "model": model})
    return pa.Table.from_pylist(rows, schema=UNIT_SCHEMA)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A ``[0, 1]`` float image as uint8 (``round(x * 255)``): exact for images decoded at
    the model's size, within half a grey level for resized ones."""
    return image.mul(255.0).round_().to(torch.uint8)


def unpack_unit(row: dict, size: int) -> DecodedBatch:
    """A row of :func:`decode_units` back as a :class:`DecodedBatch` of uint8 images (the
    model stage scales them to ``[0, 1]`` on its device)."""
    buf = row["images"]
    images = torch.from_numpy(np.frombuffer(buf, np.uint8).reshape(-1, 3, size, size).copy())
    return DecodedBatch(list(row["paths"]), images, list(row["errors"]))
