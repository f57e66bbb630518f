"""Label-free model selection: detection of synthetic anomalies in held-out normal images.

A training loss cannot tell whether the encoder got better *at detecting anomalies*: with a
random-init trunk the SSL term stays at chance and the distance terms shrink when the
embeddings collapse, so a loss-based score can improve while detection gets worse. The
selection signal here is detection itself, on anomalies whose masks are known: synthetic
anomalies (:mod:`mspray.data.anomalies`) pasted into the held-out normal images, scored
exactly as at inference (nearest-neighbour distance to a bank of training patches, eq. 7
maps, eq. 9 window-max image score). The held-out images, and the training images left out
of the selection bank, are the normal class.

Every candidate epoch is scored, **epoch 0 (the encoders as they start) included**, so
training can never hand back encoders that detect worse than the untrained ones on this
signal. The score is the mean of image and pixel AUROC; ties keep the earlier epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mspray import maps as M
from mspray import metrics
from mspray.config import MSPrayConfig
from mspray.data.anomalies import paste_anomalies
from mspray.model.encoder import PatchEncoder
from mspray.model.multiscale import normalize

#: anomalous copies of every held-out image (each with another anomaly kind)
COPIES = 4
#: rows of the selection bank (a random subset of the training patches, fixed per run)
MAX_BANK = 20_000
#: training images embedded into the selection bank
MAX_BANK_IMAGES = 32
#: normals wanted: held-out images, topped up with training images outside the bank
MIN_NORMALS = 32


@dataclass
class SelectionSet:
    """Held-out normal images (``clean``), their anomalous copies and masks, and the
    training images the bank is made of; all ``[0, 1]`` images ``B×3×H×W``."""

    clean: torch.Tensor
    anomalous: torch.Tensor
    masks: torch.Tensor
    bank_images: torch.Tensor
    seed: int

    @classmethod
    def build(cls, train_images: torch.Tensor, val_images: torch.Tensor, seed: int) -> SelectionSet:
        """The normals are ``val_images``, topped up to :data:`MIN_NORMALS` with up to half
        of ``train_images``; the bank comes from (at most :data:`MAX_BANK_IMAGES` of) the
        other training images; :data:`COPIES` anomalies are pasted into each normal."""
        clean = val_images.detach().float().cpu()
        g = torch.Generator().manual_seed(seed + 1)
        n = train_images.shape[0]
        order = torch.randperm(n, generator=g)
        # With a handful of held-out images one image moves the AUROC by a large step and
        # the ranking of epochs is mostly noise: up to half of the training images, left
        # out of the selection bank, then join them as normals (up to MIN_NORMALS in all).
        n_extra = min(max(0, MIN_NORMALS - clean.shape[0]), n // 2)
        bank = order[: min(n - n_extra, MAX_BANK_IMAGES)]
        extra = order[n - n_extra :]
        clean = torch.cat([clean, train_images[extra.sort().values].detach().float().cpu()])
        anomalous, masks = paste_anomalies(clean, COPIES, seed)
        bank_images = train_images[bank.sort().values].detach().float().cpu()
        return cls(clean, anomalous, masks, bank_images, seed)


@torch.no_grad()
def _grid(enc: PatchEncoder, images: torch.Tensor, step: int, device, bs: int) -> torch.Tensor:
    out = []
    for i in range(0, images.shape[0], bs):
        x = normalize(images[i : i + bs].to(device))
        out.append(enc(x)[:, :, ::step, ::step].permute(0, 2, 3, 1).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def scale_maps(
    enc: PatchEncoder, sel: SelectionSet, stride: int, device: torch.device | str, bs: int = 8
) -> torch.Tensor:
    """Raw pixel maps (``N×H×W``) of the clean then the anomalous images at one scale:
    nearest-neighbour distance to the bank, spread over the pixels as at inference."""
    if stride % enc.stride:
        raise ValueError(f"stride {stride} is not a multiple of the network stride {enc.stride}")
    was_training = enc.training
    enc.eval()
    step = stride // enc.stride
    bank = _grid(enc, sel.bank_images, step, device, bs).flatten(0, 2)
    if bank.shape[0] > MAX_BANK:
        g = torch.Generator().manual_seed(sel.seed + 2)
        bank = bank[torch.randperm(bank.shape[0], generator=g)[:MAX_BANK]]
    queries = torch.cat([sel.clean, sel.anomalous])
    grid = _grid(enc, queries, step, device, bs)
    b, h, w, d = grid.shape
    q = grid.reshape(-1, d)
    dist = torch.cat([torch.cdist(q[i : i + 4096], bank).amin(1) for i in range(0, len(q), 4096)])
    enc.train(was_training)
    size = tuple(queries.shape[-2:])
    return M.patch_scores_to_map(dist.view(b, h, w), enc.patch_size, stride, size)


def detection_metrics(maps: torch.Tensor, sel: SelectionSet, cfg: MSPrayConfig) -> dict[str, float]:
    """Image and pixel AUROC of raw maps (clean first, then anomalous) on the synthetic
    anomalies, and the selection ``score`` (their mean)."""
    smooth = M.gaussian_smooth(maps, cfg.model.smoothing_sigma)
    scores = M.image_scores(smooth, cfg.model.score_window, cfg.model.score_window_stride)
    n = sel.clean.shape[0]
    labels = torch.cat([torch.zeros(n), torch.ones(sel.anomalous.shape[0])])
    masks = torch.cat([torch.zeros((n, *sel.masks.shape[1:]), dtype=torch.bool), sel.masks])
    img = metrics.image_auroc(labels.numpy(), scores.numpy())
    pix = metrics.pixel_auroc(masks.numpy(), smooth.numpy())
    return {"image_auroc": img, "pixel_auroc": pix, "score": (img + pix) / 2}


def fused_metrics(
    per_scale: dict[int, torch.Tensor], sel: SelectionSet, cfg: MSPrayConfig
) -> dict[str, float]:
    """:func:`detection_metrics` of the fused map, each scale z-scored with the mean and
    std of its clean (held-out normal) maps, as z-score fusion does at inference."""
    n = sel.clean.shape[0]
    stats = {
        s: (float(m[:n].mean()), float(m[:n].std()) if n * m[0].numel() > 1 else 1.0)
        for s, m in per_scale.items()
    }
    use = stats if cfg.model.fusion == "zscore" else None
    return detection_metrics(M.fuse_maps(per_scale, use), sel, cfg)


def fused_choice(
    cfg: MSPrayConfig,
    candidates: dict[str, dict[int, PatchEncoder]],
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    device: torch.device | str = "cpu",
) -> tuple[str, dict[str, dict]]:
    """Rank whole detectors (``{name: {scale: encoder}}``, e.g. the selected encoders and
    the untrained ones) by the fused map's synthetic-anomaly score; per-scale metrics ride
    along. Returns the best name (the first on ties) and the table."""
    sel = SelectionSet.build(train_images, val_images, cfg.train.seed + 7)
    table: dict[str, dict] = {}
    for name, encoders in candidates.items():
        per = {s: scale_maps(e, sel, cfg.stride_for(s), device) for s, e in encoders.items()}
        row = fused_metrics(per, sel, cfg)
        row["per_scale"] = {str(s): detection_metrics(m, sel, cfg) for s, m in per.items()}
        table[name] = row
    best = max(table, key=lambda n: table[n]["score"])  # max keeps the first of equals
    return best, table
