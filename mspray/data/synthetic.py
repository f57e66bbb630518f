"""Synthetic MVTec-layout datasets for tests and the demo.

Two kinds of normal images, both varying from image to image but sharing one structure:

- ``texture``: a plain-weave fabric (over/under threads) with a random phase, a slow random
  warp of the threads, uneven lighting and sensor noise;
- ``object``: a hexagonal nut with a round hole, centred with a small random offset and a
  random rotation, lit from one side, on a dark background.

Defects are drawn with exact masks: ``scratch`` (a thin bright line), ``stain`` (an
irregular dark blob), ``hole`` (texture: a patch where the weave is missing) or ``chip``
(object: a bite out of the rim). Everything is vectorised numpy and deterministic in
``seed``: image ``i`` of a split depends only on ``(seed, split, i)``.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from mspray import storage

DEFECTS: dict[str, tuple[str, ...]] = {
    "texture": ("scratch", "stain", "hole"),
    "object": ("scratch", "stain", "chip"),
}
_SPLITS = {"train": 0, "test_good": 1, "test_defect": 2}


def _rng(seed: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng([seed, *ids])


def _grid(size: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) as broadcastable float32 column/row vectors of a
    ``size`` × ``width`` (default square) image."""
    c = np.arange(size, dtype=np.float32) + 0.5
    w = c if width is None else np.arange(width, dtype=np.float32) + 0.5
    return c[:, None], w[None, :]


def _smooth_field(
    rng: np.random.Generator,
    size: int,
    amp: float,
    n: int = 4,
    max_cycles: float = 2.0,
    width: int | None = None,
) -> np.ndarray:
    """A slowly varying H×W field: a sum of ``n`` random plane waves (≤ max_cycles per
    image); with ``width``, a ``size`` × ``width`` strip of smoothed noise, same std."""
    if width is not None:
        # a strip: smoothed white noise instead of plane waves, whose beats would make one
        # stretch of the strip differ from another (the strip must be stationary)
        from scipy.ndimage import gaussian_filter

        noise = gaussian_filter(rng.standard_normal((size, width)), size / (4 * max_cycles))
        return (noise * (amp * np.sqrt(n / 2) / n / noise.std())).astype(np.float32)
    yy, xx = _grid(size)
    out = np.zeros((size, size), np.float32)
    for _ in range(n):
        theta = rng.uniform(0, 2 * np.pi)
        f = rng.uniform(0.3, max_cycles) * 2 * np.pi / size
        out += np.cos(f * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
    return out * (amp / n)


def _thread_period(size: int) -> float:
    return max(size / 10.67, 4.0)  # ~24 px threads at 256, patches see a few crossings


def _texture(
    rng: np.random.Generator, size: int, width: int | None = None, period: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A plain-weave fabric image (H×W×3 float in [0,1]) and its (all-true) region;
    ``width`` > size: a long strip of the same fabric (for overlapping camera crops)."""
    yy, xx = _grid(size, width)
    period = period or _thread_period(size)
    warp_x = _smooth_field(rng, size, amp=0.12 * period, width=width)
    warp_y = _smooth_field(rng, size, amp=0.12 * period, width=width)
    u = (xx + warp_x) / period + rng.uniform(0, 1)
    v = (yy + warp_y) / period + rng.uniform(0, 1)
    fu, fv = u % 1.0, v % 1.0
    weft_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    # thread cross-sections: bright along a thread's middle, dark in the gaps between threads
    across_u, across_v = np.sin(np.pi * fu) ** 0.6, np.sin(np.pi * fv) ** 0.6
    shade = np.where(
        weft_on_top, across_v * (0.7 + 0.3 * across_u), across_u * (0.7 + 0.3 * across_v)
    )
    weft = np.array([0.78, 0.62, 0.42], np.float32)  # two thread colours, like real twill
    warp = np.array([0.70, 0.58, 0.44], np.float32)
    colour = np.where(weft_on_top[..., None], weft, warp)
    light = rng.uniform(0.92, 1.06) + _smooth_field(
        rng, size, amp=0.05, n=2, max_cycles=1.0, width=width
    )
    img = (0.15 + 0.85 * shade[..., None]) * colour * light[..., None]
    return img, np.ones(img.shape[:2], bool)


def _object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A hexagonal nut on a dark background, and the nut's region."""
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.uniform(-0.02, 0.02, 2) * size
    dy, dx = yy - cy, xx - cx
    rho = np.sqrt(dy * dy + dx * dx)
    apothem = 0.30 * size * rng.uniform(0.97, 1.03)
    rot = rng.uniform(0, np.pi / 3)
    hexd = np.max(
        [
            np.abs(dx * np.cos(rot + k * np.pi / 3) + dy * np.sin(rot + k * np.pi / 3))
            for k in range(3)
        ],
        axis=0,
    )
    hole_r = 0.45 * apothem
    region = (hexd < apothem) & (rho > hole_r)
    bg = 0.22 + _smooth_field(rng, size, amp=0.03, n=2, max_cycles=1.0)
    img = np.repeat(bg[..., None], 3, axis=2) * np.array([0.9, 0.95, 1.0], np.float32)
    light_dir = rng.uniform(-0.3, 0.3) + np.pi * 0.75
    angle = np.arctan2(dy, dx)
    # lit from one side, a machined ring pattern, and a bevel darkening toward the rim
    metal = 0.62 + 0.18 * np.cos(angle - light_dir) * np.clip(rho / apothem, 0, 1)
    metal = metal + 0.04 * np.cos(rho * (2 * np.pi / max(size / 40, 2.0)))
    metal = metal - 0.25 * np.clip((hexd - 0.85 * apothem) / (0.15 * apothem), 0, 1)
    steel = np.array([0.80, 0.78, 0.72], np.float32)
    img = np.where(region[..., None], metal[..., None] * steel, img)
    return img, region


def _segment_distance(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance of every pixel centre to the segment p0-p1 ((y, x) points)."""
    d = p1 - p0
    t = ((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-6)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def _pick_point(rng: np.random.Generator, region: np.ndarray, margin: float) -> np.ndarray:
    """A random (y, x) inside ``region``, at least ``margin`` of the size from the border."""
    size = region.shape[0]
    lo, hi = int(margin * size), int((1 - margin) * size)
    ys, xs = np.nonzero(region[lo:hi, lo:hi])
    k = rng.integers(len(ys))
    return np.array([ys[k] + lo + 0.5, xs[k] + lo + 0.5], np.float32)


def _add_defect(
    img: np.ndarray, region: np.ndarray, defect: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect on ``img`` (inside ``region``); returns (image, defect mask)."""
    size = img.shape[0]
    yy, xx = _grid(size)
    if defect == "scratch":
        c = _pick_point(rng, region, 0.2)
        theta = rng.uniform(0, np.pi)
        half = rng.uniform(0.12, 0.25) * size
        d = half * np.array([np.sin(theta), np.cos(theta)], np.float32)
        width = max(1.0, size / 128) * rng.uniform(1.0, 1.5)
        alpha = np.clip(width / 2 + 0.5 - _segment_distance(yy, xx, c - d, c + d), 0, 1)
        alpha = alpha * region
        colour = np.array([0.97, 0.96, 0.92], np.float32)
        img = img * (1 - 0.9 * alpha[..., None]) + 0.9 * alpha[..., None] * colour
        return img, alpha > 0.25
    if defect == "stain":
        c = _pick_point(rng, region, 0.15)
        r0 = rng.uniform(0.06, 0.11) * size
        dy, dx = yy - c[0], xx - c[1]
        ang = np.arctan2(dy, dx)
        wobble = [
            rng.uniform(0.05, 0.15) * np.cos(k * ang + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
        ]
        r = r0 * (1 + sum(wobble))
        alpha = np.clip((r - np.hypot(dy, dx)) / (0.2 * r0), 0, 1) * region
        colour = np.array([0.30, 0.20, 0.08], np.float32)
        img = img * (1 - 0.75 * alpha[..., None]) + 0.75 * alpha[..., None] * colour
        return img, alpha > 0.3
    if defect == "hole":
        c = _pick_point(rng, region, 0.15)
        a, b = rng.uniform(0.05, 0.10, 2) * size
        t = rng.uniform(0, np.pi)
        dy, dx = yy - c[0], xx - c[1]
        along, across = dx * np.cos(t) + dy * np.sin(t), dy * np.cos(t) - dx * np.sin(t)
        mask = ((along / a) ** 2 + (across / b) ** 2 < 1.0) & region
        # threads missing: the flat dark backing shows through
        backing = 0.45 * img[region].mean(axis=0)
        img = np.where(mask[..., None], backing, img)
        return img, mask
    if defect == "chip":
        # a bite out of the rim: centre on the object's outer edge, background shows through
        inner = region.copy()
        for shift, axis in ((2, 0), (-2, 0), (2, 1), (-2, 1)):
            inner &= np.roll(region, shift, axis=axis)
        edge = region & ~inner
        c = _pick_point(rng, edge, 0.1)
        r = rng.uniform(0.06, 0.10) * size
        mask = (np.hypot(yy - c[0], xx - c[1]) < r) & region
        bg = 0.2 + 0.02 * rng.standard_normal(3).astype(np.float32)
        img = np.where(mask[..., None], bg, img)
        return img, mask
    raise ValueError(f"unknown defect {defect!r}")


def make_image(
    kind: str, size: int, rng: np.random.Generator, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image (H×W×3 uint8) and its defect mask (H×W bool, all false when
    ``defect`` is None)."""
    if kind not in DEFECTS:
        raise ValueError(f"unknown synthetic kind {kind!r}; use one of {sorted(DEFECTS)}")
    img, region = (_texture if kind == "texture" else _object)(rng, size)
    mask = np.zeros((size, size), bool)
    if defect is not None:
        if defect not in DEFECTS[kind]:
            raise ValueError(f"defect {defect!r} is not one of {DEFECTS[kind]} for {kind}")
        img, mask = _add_defect(img, region, defect, rng)
    img = img + rng.normal(0, 0.02, img.shape).astype(np.float32)  # sensor noise
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), mask


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an H×W (grayscale) or H×W×3 (RGB) uint8 array."""
    buf = io.BytesIO()
    # fast compression: noisy images barely compress anyway
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_png(uri: str, array: np.ndarray) -> None:
    """Write an H×W or H×W×3 uint8 array as a PNG (local path or s3://)."""
    storage.write_bytes(uri, encode_png(array))


def make_synthetic_dataset(
    root: str,
    category: str = "synthetic",
    n_train: int = 20,
    n_test_good: int = 6,
    n_test_defect: int = 6,
    size: int = 256,
    seed: int = 0,
    kind: str = "texture",
) -> str:
    """Write an MVTec-layout dataset under ``root/category`` and return that path.

    Defect images cycle through the kind's defect types; masks are 255 on the defect.
    Existing files with the same names are overwritten, others are left alone.
    """
    if kind not in DEFECTS:
        raise ValueError(f"unknown synthetic kind {kind!r}; use one of {sorted(DEFECTS)}")
    if size < 32:
        raise ValueError(f"synthetic images need size >= 32, got {size}")
    cat = storage.join(root, category)
    for i in range(n_train):
        img, _ = make_image(kind, size, _rng(seed, _SPLITS["train"], i))
        write_png(storage.join(cat, "train", "good", f"{i:03d}.png"), img)
    for i in range(n_test_good):
        img, _ = make_image(kind, size, _rng(seed, _SPLITS["test_good"], i))
        write_png(storage.join(cat, "test", "good", f"{i:03d}.png"), img)
    defects = DEFECTS[kind]
    for i in range(n_test_defect):
        defect = defects[i % len(defects)]
        name = f"{i // len(defects):03d}"
        img, mask = make_image(kind, size, _rng(seed, _SPLITS["test_defect"], i), defect)
        write_png(storage.join(cat, "test", defect, f"{name}.png"), img)
        write_png(
            storage.join(cat, "ground_truth", defect, f"{name}_mask.png"),
            mask.astype(np.uint8) * 255,
        )
    return cat


def make_strip_dataset(
    root: str,
    category: str = "strip",
    n_train: int = 60,
    n_test_good: int = 60,
    n_test_defect: int = 30,
    n_production: int = 0,
    production_anomaly_rate: float = 0.0,
    size: int = 64,
    step: int | None = None,
    brightness: float = 0.0,
    contrast: float = 1.0,
    seed: int = 0,
) -> str:
    """Consecutive overlapping crops of ONE long fabric strip under a fixed camera (an
    MVTec-layout dataset under ``root/category``; returns that path).

    Crop ``i`` starts ``i * step`` pixels along the strip (default ``step = size // 2``:
    neighbours overlap by half), so every training crop has near-duplicates among the other
    training crops. Along the strip: ``n_train`` training crops (``train/good``), then
    ``n_production`` unlabelled crops (``production/``, a fraction
    ``production_anomaly_rate`` of them with a defect), then the test crops (``test/good``
    and ``test/<defect>`` with masks); two crops' worth of strip separate the three parts,
    so no production or test crop overlaps a training crop. ``brightness`` (added) and
    ``contrast`` (around mid-grey) change the production and test crops only: a drift of
    the camera after training.
    """
    if size < 32:
        raise ValueError(f"synthetic images need size >= 32, got {size}")
    step = step or size // 2
    if not 0 < step <= size:
        raise ValueError(f"step must be in (0, size], got {step}")
    if not 0.0 <= production_anomaly_rate <= 1.0:
        raise ValueError(
            f"production_anomaly_rate must be in [0, 1], got {production_anomaly_rate}"
        )
    sep = -(-size // step) + 1  # crops' worth of positions between parts: no overlap
    starts = {"train": 0, "production": n_train + sep}
    starts["test"] = starts["production"] + n_production + (sep if n_production else 0)
    n_pos = starts["test"] + n_test_good + n_test_defect
    rng = _rng(seed, 10)
    # threads advance by k + 0.618 periods from one crop to the next: the crops' thread
    # phases then spread evenly (golden ratio), so no stretch of the strip is special
    k = max(1, math.floor(step / _thread_period(size)))
    period = step / (k + (math.sqrt(5) - 1) / 2)
    strip, _ = _texture(rng, size, size + step * (n_pos - 1), period)
    region = np.ones((size, size), bool)
    cat = storage.join(root, category)

    def crop(pos: int, split: str, i: int, defect: str | None, drift: bool) -> tuple:
        r = _rng(seed, 11, _SPLITS.get(split, 3), i)
        img = strip[:, pos * step : pos * step + size].copy()
        mask = np.zeros((size, size), bool)
        if defect is not None:
            img, mask = _add_defect(img, region, defect, r)
        if drift:
            img = (img - 0.5) * contrast + 0.5 + brightness
        img = img + r.normal(0, 0.02, img.shape).astype(np.float32)  # sensor noise per frame
        return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), mask

    for i in range(n_train):
        img, _ = crop(starts["train"] + i, "train", i, None, False)
        write_png(storage.join(cat, "train", "good", f"{i:04d}.png"), img)
    n_anom = round(production_anomaly_rate * n_production)
    # anomalies spread evenly over the batch, deterministic
    anom = set(np.linspace(0, n_production - 1, n_anom).round().astype(int)) if n_anom else set()
    for i in range(n_production):
        defect = DEFECTS["texture"][i % 3] if i in anom else None
        img, _ = crop(starts["production"] + i, "production", i, defect, True)
        write_png(storage.join(cat, "production", f"{i:04d}.png"), img)
    for i in range(n_test_good):
        img, _ = crop(starts["test"] + i, "test_good", i, None, True)
        write_png(storage.join(cat, "test", "good", f"{i:04d}.png"), img)
    for i in range(n_test_defect):
        defect = DEFECTS["texture"][i % 3]
        name = f"{i // 3:04d}"
        pos = starts["test"] + n_test_good + i
        img, mask = crop(pos, "test_defect", i, defect, True)
        write_png(storage.join(cat, "test", defect, f"{name}.png"), img)
        write_png(
            storage.join(cat, "ground_truth", defect, f"{name}_mask.png"),
            mask.astype(np.uint8) * 255,
        )
    return cat
