"""Image decoding and loading: bytes -> H×W×3 uint8 RGB -> 3×S×S float tensors.

Every malformed input (empty, not an image, truncated, decompression bomb, exotic mode)
raises :class:`ImageDecodeError` naming the file, so batch jobs can record one error row
per bad image instead of crashing.
"""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mspray import storage
from mspray.config.run import progress_bar

# Modes PIL converts to RGB faithfully; alpha channels are dropped, not composited.
_TO_RGB = {
    "1",
    "L",
    "LA",
    "La",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBa",
    "RGBX",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message names the file.

    ``reason`` says why, for callers that map it to a status (e.g. HTTP 400/413/415):
    ``"empty"``, ``"too_large"`` (pixel count / decompression bomb), ``"unsupported"``
    (a decodable image in a mode we do not handle) or ``"corrupt"`` (anything else).
    """

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep ``reason`` across pickling (Ray ships exceptions)
        return type(self), (str(self), self.reason)


def _to_rgb(img: Image.Image, name: str) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT:
        a = np.asarray(img).astype(np.float32)
        # 16-bit grayscale (PNG/TIFF) maps 0..65535 to 0..255. Mode "I" (32-bit int) carries
        # no bit depth, so there the value range decides: 8-bit, 16-bit or its own maximum.
        top = 65535.0
        if img.mode == "I":
            hi = float(a.max()) if a.size else 0.0
            top = 255.0 if hi <= 255 else (65535.0 if hi <= 65535 else hi)
        a = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if img.mode not in _TO_RGB:
        raise ImageDecodeError(f"{name}: unsupported image mode {img.mode!r}", "unsupported")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # a writable copy (asarray is read-only)


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode image bytes to an H×W×3 uint8 RGB array.

    The pixel count is checked from the header before any pixel is decoded, so a
    decompression bomb costs nothing. Raises only :class:`ImageDecodeError` for bad bytes.
    """
    if not data:
        raise ImageDecodeError(f"{name}: empty file", "empty")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; make it an error
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise ImageDecodeError(f"{name}: image has no pixels ({w}x{h})")
                if w * h > max_pixels:
                    raise ImageDecodeError(
                        f"{name}: {w}x{h} = {w * h} pixels is over the "
                        f"limit of {max_pixels} (decompression bomb?)",
                        "too_large",
                    )
                img.load()  # decode everything now: truncated data fails here, not later
                return np.ascontiguousarray(_to_rgb(img, name))
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"{name}: decompression bomb ({e})", "too_large") from None
    except Exception as e:  # PIL raises many exception types for corrupt input
        raise ImageDecodeError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None


def to_tensor(img: np.ndarray, size: int) -> torch.Tensor:
    """H×W×3 (or H×W) uint8 -> 3×size×size float32 in [0, 1] (antialiased bilinear)."""
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if not (img.flags.writeable and img.flags.c_contiguous):
        img = np.array(img)  # torch.from_numpy wants writable, contiguous memory
    t = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
    if t.shape[1:] != (size, size):
        t = F.interpolate(
            t[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )[0]
        t = t.clamp_(0.0, 1.0)  # float rounding can step just outside [0, 1]
    return t.contiguous()


def load_image(uri: str, size: int, max_pixels: int = 40_000_000) -> torch.Tensor:
    """Read, decode and resize one image to 3×size×size float32 in [0, 1]."""
    return to_tensor(decode_image(storage.read_bytes(uri), uri, max_pixels), size)


def load_mask(uri: str | None, size: int) -> torch.Tensor:
    """Ground-truth mask as size×size uint8 in {0, 1} (any nonzero pixel is a defect);
    ``None`` gives all zeros (a normal image)."""
    if uri is None:
        return torch.zeros(size, size, dtype=torch.uint8)
    rgb = decode_image(storage.read_bytes(uri), uri)
    m = torch.from_numpy((rgb.max(axis=2) > 0).astype(np.float32))
    if m.shape != (size, size):
        # nearest-exact: plain nearest, but sampling pixel centres (no half-pixel shift)
        m = F.interpolate(m[None, None], size=(size, size), mode="nearest-exact")[0, 0]
    return (m > 0.5).to(torch.uint8)


def load_images(uris: list[str], size: int, desc: str = "loading images") -> torch.Tensor:
    """Load many images into an N×3×size×size float32 tensor, in order.

    A few threads overlap S3 round trips (and PIL's zlib/JPEG work, which drops the GIL).
    """
    if not uris:
        return torch.empty(0, 3, size, size)
    out = torch.empty(len(uris), 3, size, size)
    workers = min(8 if any(storage.is_remote(u) for u in uris) else 4, len(uris))
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        progress_bar(total=len(uris), desc=desc, unit="img") as bar,
    ):
        for i, t in enumerate(pool.map(lambda u: load_image(u, size), uris)):
            out[i] = t
            bar.update(1)
    return out
