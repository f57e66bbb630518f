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

import math
from dataclasses import dataclass

import torch

from mspray.model.encoder import N_ANGLES
from mspray.model.scales import SCALES

#: Paper: SVDD/Cos neighbour within ±4 px (64), ±2 (32), ±1 (16).
NEIGHBOUR_RADIUS = {p: s.neighbour_radius for p, s in SCALES.items()}


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


def angle_offsets(
    labels: torch.Tensor, d_lo: float, d_hi: float, g: torch.Generator
) -> torch.Tensor:
    """Offsets of patch n about m for angle classes ``labels``, at a distance uniform in
    ``[d_lo, d_hi]``, rounded to integers. Rounding moves the point by < 1 px, far less than
    the 15° half-width of a class at these distances, so the label stays exact."""
    theta = labels.double() * (2 * math.pi / N_ANGLES)
    d = d_lo + (d_hi - d_lo) * torch.rand(labels.numel(), generator=g, dtype=torch.float64)
    dx = torch.round(d * torch.cos(theta)).long()
    dy = torch.round(-d * torch.sin(theta)).long()
    return torch.stack([dy, dx], 1)


def offset_angle_class(off: torch.Tensor) -> torch.Tensor:
    """Nearest angle class of ``n×2`` (dy, dx) offsets (inverse of :func:`angle_offsets`)."""
    ang = torch.atan2(-off[:, 0].double(), off[:, 1].double()) % (2 * math.pi)
    return torch.round(ang / (2 * math.pi / N_ANGLES)).long() % N_ANGLES


def sample_angles(
    img: torch.Tensor, h: int, w: int, p: int, g: torch.Generator, jitter: float = 0.125
) -> Samples:
    """SSL pairs (m, n) with n about one patch size (p·(1±jitter)) from m at one of 12
    angles; no patch is ever clipped, so every label is correct by construction.

    m is drawn uniformly from the box where the pair fits *at every angle*, independently
    of the label: m's position carries no information about the angle (drawing m only where
    its own angle fits made the label predictable from m's position, ~2x chance). On images
    smaller than p + 2·p·(1+jitter) the distance shrinks to fit that box (never below p/2).
    n's position is m's plus the offset, so it cannot also be independent of the label
    inside a bounded image."""
    d_hi = min(p * (1 + jitter), (min(h, w) - p) / 2)
    _check(h, w, p, 2 * p)
    d_lo = min(p * (1 - jitter), d_hi)
    n = img.numel()
    labels = torch.randint(0, N_ANGLES, (n,), generator=g)
    off = angle_offsets(labels, d_lo, d_hi, g)
    r = int(math.ceil(d_hi))  # every rounded offset of every angle is within ±r
    m = _corners(n, h, w, p, g, margin=r)
    return Samples(img, (m, m + off), labels)


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
