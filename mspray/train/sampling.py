"""Patch position sampling for the four losses (paper section 3.3), vectorised.

Every sampler returns integer top-left corners ``(y, x)`` as ``n×2`` long tensors, plus the
image index of each sample, for a batch of images of size ``H×W``. Positions are chosen so
that *every* patch lies fully inside its image: nothing is clipped afterwards, so offsets and
angle labels are exactly what was drawn (the public code clipped at the border, which made
about a third of its angle labels wrong).

Coordinates: ``y`` grows downwards, ``x`` to the right. Angle class ``c`` means patch ``n``
sits at ``c·30°`` counter-clockwise from the +x axis around patch ``m`` as seen on screen,
i.e. ``dx = d·cos(θ)``, ``dy = -d·sin(θ)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from mspray.config import MSPrayConfig, TrainConfig
from mspray.model.encoder import N_ANGLES
from mspray.model.scales import SCALES

#: Paper: SVDD/Cos neighbour within ±4 px (64), ±2 (32), ±1 (16).
NEIGHBOUR_RADIUS = {p: s.neighbour_radius for p, s in SCALES.items()}

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """Positions of one loss's samples: ``img`` (n,), and one or more ``n×2`` corners."""

    img: torch.Tensor
    pos: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.img.numel())

    def take(self, idx: torch.Tensor) -> Samples:
        return Samples(
            self.img[idx],
            tuple(p[idx] for p in self.pos),
            None if self.labels is None else self.labels[idx],
        )


def _uniform(n: int, lo: torch.Tensor, hi: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Integers uniform in [lo, hi] (inclusive), elementwise."""
    u = torch.rand(n, generator=g)
    return (lo + torch.floor(u * (hi - lo + 1).to(u.dtype)).long()).clamp(max=hi)


def _corners(n: int, h: int, w: int, p: int, g: torch.Generator, margin: int = 0) -> torch.Tensor:
    y = _uniform(n, torch.tensor(margin), torch.tensor(h - p - margin), g)
    x = _uniform(n, torch.tensor(margin), torch.tensor(w - p - margin), g)
    return torch.stack([y, x], 1)


def balanced_images(n_images: int, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` image indices, each image used ⌊n/N⌋ or ⌈n/N⌉ times, in random order."""
    idx = torch.cat(
        [
            torch.arange(n_images).repeat(n // n_images),
            torch.randperm(n_images, generator=g)[: n % n_images],
        ]
    )
    return idx[torch.randperm(n, generator=g)]


def _check(h: int, w: int, p: int, need: int) -> None:
    if min(h, w) < need:
        raise ValueError(f"image {h}x{w} too small for patch {p} sampling (needs {need} px)")


def neighbour_offsets(n: int, radius: int, g: torch.Generator) -> torch.Tensor:
    """``n×2`` non-zero offsets uniform in ``[-radius, radius]²``."""
    side = 2 * radius + 1
    # Draw from the side²-1 non-zero cells directly: no rejection loop.
    k = torch.randint(0, side * side - 1, (n,), generator=g)
    k = k + (k >= (side * side) // 2).long()
    return torch.stack([k // side - radius, k % side - radius], 1)


def sample_svdd(img: torch.Tensor, h: int, w: int, p: int, g: torch.Generator) -> Samples:
    """Pairs (i, j) with j a neighbour of i within ±r px (r per patch size)."""
    r = NEIGHBOUR_RADIUS[p]
    _check(h, w, p, p + 2 * r)
    n = img.numel()
    i = _corners(n, h, w, p, g, margin=r)
    return Samples(img, (i, i + neighbour_offsets(n, r, g)))


def sample_triplets(
    img: torch.Tensor, h: int, w: int, p: int, g: torch.Generator, candidates: int = 16
) -> Samples:
    """Triplets (i, j near, k far): j within ±r of i, k at Chebyshev distance ≥ p from i
    (no overlap with i). Among ``candidates`` uniform draws for k the first far one is
    kept (the farthest if none is), which keeps k uniform over the far region."""
    r = NEIGHBOUR_RADIUS[p]
    _check(h, w, p, p + 2 * r)
    n = img.numel()
    i = _corners(n, h, w, p, g, margin=r)
    j = i + neighbour_offsets(n, r, g)
    cand = _corners(n * candidates, h, w, p, g).view(n, candidates, 2)
    dist = (cand - i[:, None, :]).abs().amax(-1)
    far = dist >= p
    first = torch.where(far.any(1), far.float().argmax(1), dist.argmax(1))
    k = cand[torch.arange(n), first]
    return Samples(img, (i, j, k))


#: The SSL term of a scale runs only where its pairs are label-free: the best classifier of
#: the angle from ONE patch's position alone (either patch; :func:`angle_leak`) must stay
#: within this factor of chance (1/12). No sampler reaches chance in a bounded image (the
#: pair's two positions differ by the offset itself); the one below leaks about
#: (1 + 0.7·d/(S-d))× chance for d ≈ p and S = side - p: 1.7× at 256 px and p=64, 8× at
#: 128 px and p=64, where the term is skipped.
LEAK_LIMIT = 2.0


def _offsets(labels: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    theta = labels.double() * (2 * math.pi / N_ANGLES)
    dx = torch.round(d * torch.cos(theta)).long()
    dy = torch.round(-d * torch.sin(theta)).long()
    return torch.stack([dy, dx], 1)


def angle_offsets(
    labels: torch.Tensor, d_lo: float, d_hi: float, g: torch.Generator
) -> torch.Tensor:
    """Offsets of patch n about m for angle classes ``labels``, at a distance uniform in
    ``[d_lo, d_hi]``, rounded to integers. Rounding moves the point by < 1 px, far less than
    the 15° half-width of a class at these distances, so the label stays exact."""
    d = d_lo + (d_hi - d_lo) * torch.rand(labels.numel(), generator=g, dtype=torch.float64)
    return _offsets(labels, d)


def _own_box(off: torch.Tensor, h: int, w: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per offset, the lowest and highest corner of m for which m and m + off fit."""
    hi = torch.tensor([h - p, w - p])
    return (-off).clamp(min=0), hi - off.clamp(min=0)


def _density(lo: torch.Tensor, hi: torch.Tensor, size: int, bins: int) -> torch.Tensor:
    """``k×bins``: the uniform distribution over integers [lo, hi] in ``bins`` equal bins."""
    x = torch.arange(size)
    inside = ((x >= lo[:, None]) & (x <= hi[:, None])).double()
    inside /= inside.sum(1, keepdim=True)
    return torch.zeros(len(lo), bins, dtype=torch.float64).index_add_(1, x * bins // size, inside)


def angle_leak(h: int, w: int, p: int, jitter: float = 0.125, grid: int = 256) -> float:
    """The accuracy of the best classifier of the angle class from the position of one patch
    of a :func:`sample_angles` pair, the more telling of the two (1/12: no leak at all; 1.0
    where the image cannot hold the pairs). Exact over 9 distances of the jitter range, on
    positions binned to at most ``grid`` per axis (a binned classifier is no better)."""
    d_hi = p * (1 + jitter)
    if min(h, w) < p + math.ceil(d_hi) + 1:
        return 1.0
    d = torch.linspace(p * (1 - jitter), d_hi, 9, dtype=torch.float64)
    labels = torch.arange(N_ANGLES).repeat_interleave(len(d))
    off = _offsets(labels, d.repeat(N_ANGLES))
    worst = 0.0
    for o in (off, -off):  # m's position; n's is m's under the opposite offset
        lo, hi = _own_box(o, h, w, p)
        ay = _density(lo[:, 0], hi[:, 0], h - p + 1, min(grid, h - p + 1))
        ax = _density(lo[:, 1], hi[:, 1], w - p + 1, min(grid, w - p + 1))
        # P(position | class), a mixture over the distances; the Bayes classifier's accuracy
        # is the mean over classes of the mass where that class is the most likely one
        q = torch.einsum(
            "cky,ckx->cyx", ay.view(N_ANGLES, len(d), -1), ax.view(N_ANGLES, len(d), -1)
        )
        worst = max(worst, float(q.amax(0).sum()) / (len(d) * N_ANGLES))
    return worst


def ssl_skip_reason(h: int, w: int, p: int, jitter: float = 0.125) -> str | None:
    """Why the SSL term of scale ``p`` cannot run on ``h×w`` images, or None when it can:
    its pairs would tell the angle by position (:data:`LEAK_LIMIT`). The distance is never
    shrunk to fit, which would make the pairs another task."""
    leak = angle_leak(h, w, p, jitter)
    if leak <= LEAK_LIMIT / N_ANGLES:
        return None
    if leak >= 1.0:
        return f"{h}x{w} px images cannot hold angle pairs of {p}-px patches {p} px apart"
    return (
        f"{h}x{w} px images are too small for label-free angle pairs of {p}-px patches "
        f"(a patch's position alone tells the angle {leak:.0%} of the time, chance "
        f"{1 / N_ANGLES:.0%}, limit {LEAK_LIMIT / N_ANGLES:.0%})"
    )


def sample_angles(
    img: torch.Tensor, h: int, w: int, p: int, g: torch.Generator, jitter: float = 0.125
) -> Samples:
    """SSL pairs (m, n) with n about one patch size (p·(1±jitter)) from m at one of 12
    angles; no patch is ever clipped, so every label is correct by construction.

    m is uniform over the corners where the pair fits at its own offset, n = m + offset:
    the two positions are then equally (un)informative (n's distribution for angle c is m's
    for angle c + 6), and among the samplers tried (m uniform where every angle fits, the
    pair's midpoint uniform there, softened boxes) this one tells the angle least from
    either position (:func:`angle_leak`). Raises ValueError where the image cannot hold
    the pairs; where they would leak more than :data:`LEAK_LIMIT` the trainer skips the
    SSL term (:func:`without_leaky_ssl`)."""
    if angle_leak(h, w, p, jitter) >= 1.0:
        raise ValueError(ssl_skip_reason(h, w, p, jitter))
    n = img.numel()
    labels = torch.randint(0, N_ANGLES, (n,), generator=g)
    off = angle_offsets(labels, p * (1 - jitter), p * (1 + jitter), g)
    lo, hi = _own_box(off, h, w, p)
    m = torch.stack([_uniform(n, lo[:, k], hi[:, k], g) for k in (0, 1)], 1)
    return Samples(img, (m, m + off), labels)


def without_leaky_ssl(cfg: MSPrayConfig, scale: int) -> TrainConfig:
    """``cfg.train``, less the SSL term where ``scale``'s angle pairs cannot be label-free
    on the configured image size (:func:`ssl_skip_reason`, logged)."""
    t = cfg.train
    size = cfg.model.image_size
    why = ssl_skip_reason(size, size, scale) if "ssl" in t.losses else None
    if why is None:
        return t
    if t.losses == ("ssl",):  # nothing would be left to train (a loss ablation)
        log.warning("scale %d: SSL is the only loss, kept although %s", scale, why)
        return t
    log.warning("scale %d: SSL term skipped: %s", scale, why)
    return t.model_copy(update={"losses": tuple(x for x in t.losses if x != "ssl")})


def sample_patches(img: torch.Tensor, h: int, w: int, p: int, g: torch.Generator) -> Samples:
    """Single patches uniform over the image (K-means loss and center fitting)."""
    _check(h, w, p, p)
    return Samples(img, (_corners(img.numel(), h, w, p, g),))


def jitter_colour(
    patches: torch.Tensor, g: torch.Generator, shift: float = 0.1, noise: float = 0.02
) -> torch.Tensor:
    """SSL augmentation of the authors' code: a random shift of each channel (±``shift``)
    and Gaussian noise (std ``noise``), per patch, in [0, 1] image units (the patches are
    ImageNet-normalised, so both are divided by the channel std). Each patch of a pair gets
    its own draw, so colour fringes cannot tell the angle."""
    from mspray.model.backbone import IMAGENET_STD

    n, c = patches.shape[:2]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[None, :, None, None]
    d = (torch.rand(n, c, 1, 1, generator=g) * 2 - 1) * shift
    d = d + torch.randn(patches.shape, generator=g) * noise
    return patches + (d / std).to(patches.device, patches.dtype)


def crop(images: torch.Tensor, img: torch.Tensor, pos: torch.Tensor, p: int) -> torch.Tensor:
    """Gather ``n`` patches ``n×C×p×p`` from ``images`` (B×C×H×W) in one indexing op."""
    ar = torch.arange(p, device=images.device)
    img = img.to(images.device)
    pos = pos.to(images.device)
    rows = (pos[:, 0, None] + ar)[:, :, None]  # n×p×1
    cols = (pos[:, 1, None] + ar)[:, None, :]  # n×1×p
    # images[b, :, rows, cols] -> n×p×p×C with advanced indexing on dims 0, 2, 3.
    out = images.permute(0, 2, 3, 1)[img[:, None, None], rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()
