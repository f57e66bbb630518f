"""Label-free model selection: detection of synthetic anomalies in held-out normal images.

A training loss cannot tell whether the encoder got better *at detecting anomalies*: with a
random-init trunk the SSL term stays at chance and the distance terms shrink when the
embeddings collapse, so a loss-based score can improve while detection gets worse. The
selection signal here is detection itself, on anomalies whose masks are known: synthetic
anomalies (:mod:`mspray.data.anomalies`) pasted into held-out normal images, scored as at
inference (nearest-neighbour distance to a coreset bank of training patches built as the
real bank is, eq. 7 maps, eq. 9 window-max image score).

Every candidate epoch is scored, **epoch 0 (the encoders as they start) included**, so
training can never hand back encoders that detect worse than the untrained ones on this
signal. The score is the mean of image and pixel AUROC; ties keep the earlier epoch.

What keeps it cheap (it runs once per epoch and scale, and once more for the fused check):

- one :class:`SelectionSet` per run, the same for every scale and the fused check;
- every image is scored on a *window* of about half the image around its anomaly, not the
  whole image; a normal is the same window of the same image without the anomaly, so the
  pair differs only by the anomaly (:func:`window_size`);
- the bank is a greedy coreset (``bank.coreset_ratio``, as inference builds it) of the
  patches of a few whole training images at the bank stride;
- raw patch scores are cached by the encoder's weights, so a candidate scored once (epoch 0,
  the selected epoch) costs nothing when the fused check scores it again.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from mspray import maps as M
from mspray.bank import PatchBank
from mspray.config import MSPrayConfig
from mspray.config.run import progress_bar
from mspray.data.anomalies import KINDS, paste_anomalies
from mspray.detector import resolve_memory_format, search_bank
from mspray.evaluation import metrics
from mspray.model.encoder import PatchEncoder
from mspray.model.multiscale import normalize

log = logging.getLogger(__name__)

#: anomalous copies of every normal image (the kinds cycling): 2 instead of 4 let selection
#: pick a worse epoch (object seed 1: 0.909 vs 0.988 image AUROC; texture seed 2: 0.911 vs 0.987)
COPIES = 4
#: whole training images the selection bank is made of (whole: on aligned objects a
#: window's content depends on where it is, and windows at random places miss it)
MAX_BANK_IMAGES = 8
#: normals wanted: held-out images first, topped up with training images outside the bank
MIN_NORMALS = 32
#: raw patch-score grids kept for reuse (a few hundred kB each)
CACHE_ENTRIES = 128
_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_LAST_SET: list = [None, None]  # (inputs' key, SelectionSet) of the last build


def selection_kinds(cfg: MSPrayConfig) -> tuple[str, ...]:
    """The anomaly kinds selection pastes: all of them, less those stage one trained the
    trunk on (``train.stage_one_kinds``) when it runs, so that selection never grades the
    model on the exam it trained for."""
    if not cfg.train.stage_one:
        return KINDS
    return tuple(k for k in KINDS if k not in cfg.train.stage_one_kinds)


def window_size(cfg: MSPrayConfig) -> int:
    """Side of the scored windows: at least half the image and twice the largest patch,
    the smallest such side on which every scale's patch grid tiles (else the image)."""
    size = cfg.model.image_size
    pairs = list(zip(cfg.model.scales, cfg.model.strides, strict=True))
    for w in range(max(size // 2, 2 * max(cfg.model.scales)), size):
        if all((w - p) % s == 0 for p, s in pairs):
            return w
    return size


def _window(mask: torch.Tensor, w: int) -> tuple[int, int]:
    """Top-left corner of the ``w×w`` window centred on ``mask``'s bounding box."""
    ys, xs = mask.nonzero(as_tuple=True)
    h, wd = mask.shape
    cy, cx = (int(ys.min()) + int(ys.max())) // 2, (int(xs.min()) + int(xs.max())) // 2
    return min(max(cy - w // 2, 0), h - w), min(max(cx - w // 2, 0), wd - w)


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class SelectionSet:
    """Windows (``B×3×w×w`` in ``[0, 1]``) of the normal images (``clean``), the same
    windows with an anomaly (``anomalous``, ``masks``), and the whole training images
    the bank is made of; ``info`` says where the normals came from (for ``meta.json``)."""

    clean: torch.Tensor
    anomalous: torch.Tensor
    masks: torch.Tensor
    bank_images: torch.Tensor
    seed: int
    info: dict = field(default_factory=dict)
    key: str = ""

    @classmethod
    def build(
        cls, cfg: MSPrayConfig, train_images: torch.Tensor, val_images: torch.Tensor
    ) -> SelectionSet:
        """The set of :meth:`make`, made once per run: every scale and the fused check
        of one fit get the same set (so scores of unchanged encoders can be reused)."""
        key = (
            _digest(train_images, val_images),
            cfg.train.seed,
            cfg.train.stage_one,
            cfg.train.stage_one_kinds,
            window_size(cfg),
        )
        if _LAST_SET[0] != key:
            _LAST_SET[:] = [key, cls.make(cfg, train_images, val_images)]
        return _LAST_SET[1]

    @classmethod
    def make(
        cls, cfg: MSPrayConfig, train_images: torch.Tensor, val_images: torch.Tensor
    ) -> SelectionSet:
        """Normals are ``val_images``, topped up to :data:`MIN_NORMALS` with up to half of
        ``train_images`` only when there are fewer held-out images (logged); the bank comes
        from (at most :data:`MAX_BANK_IMAGES` of) the other training images, whole;
        :data:`COPIES` anomalies of :func:`selection_kinds` are pasted
        into each normal. Deterministic in ``cfg.train.seed``."""
        seed = cfg.train.seed + 7
        w = window_size(cfg)
        full = val_images.detach().float().cpu()
        n_val = full.shape[0]
        g = torch.Generator().manual_seed(seed + 1)
        n = train_images.shape[0]
        order = torch.randperm(n, generator=g)
        # With a handful of held-out images one image moves the AUROC by a large step and
        # the ranking of epochs is mostly noise: up to half of the training images, left
        # out of the selection bank, then join them as normals (up to MIN_NORMALS in all).
        n_extra = min(max(0, MIN_NORMALS - n_val), n // 2)
        bank = order[: min(n - n_extra, MAX_BANK_IMAGES)].sort().values
        extra = order[n - n_extra :].sort().values
        full = torch.cat([full, train_images[extra].detach().float().cpu()])
        kinds = selection_kinds(cfg)
        anomalous, masks = paste_anomalies(full, COPIES, seed, kinds)
        corners = [_window(m, w) for m in masks]
        crop = lambda x, c: x[..., c[0] : c[0] + w, c[1] : c[1] + w]  # noqa: E731
        # a normal window is the window of the image's first anomaly, without it
        clean = torch.stack([crop(x, c) for x, c in zip(full, corners, strict=False)])
        anomalous = torch.stack([crop(a, c) for a, c in zip(anomalous, corners, strict=True)])
        masks = torch.stack([crop(m, c) for m, c in zip(masks, corners, strict=True)])
        bank_images = train_images[bank].detach().float().cpu()
        info = {
            "normals_held_out": n_val,
            "train_images": n,
            "normals_from_training": int(n_extra),
            "bank_images": len(bank),
            "window": w,
            "kinds": list(kinds),
            "copies": COPIES,
        }
        if n_extra:
            log.info(
                "selection: %d held-out images, topped up with %d training images (outside "
                "the selection bank) as normals",
                n_val,
                n_extra,
            )
        sel = cls(clean, anomalous, masks, bank_images, seed, info)
        sel.key = _digest(clean, anomalous, bank_images)
        return sel


@torch.no_grad()
def _grid(
    enc: PatchEncoder, images: torch.Tensor, step: int, device, bs: int, bar: Any, layout
) -> torch.Tensor:
    out = []
    for i in range(0, images.shape[0], bs):
        x = normalize(images[i : i + bs].to(device)).contiguous(memory_format=layout)
        out.append(enc(x, step=step).permute(0, 2, 3, 1).float().cpu())
        bar.update(x.shape[0])
    return torch.cat(out)


def bank_ratio(cfg: MSPrayConfig, enc: PatchEncoder, sel: SelectionSet, rows: int) -> float:
    """Coreset ratio of the selection bank: the greedy coreset keeps as many of the bank
    images' ``rows`` as the real bank keeps of all training images (``coreset_ratio`` of
    them, at most ``coreset_max_size``), so both cover the patches about as densely."""
    side = (cfg.model.image_size - enc.patch_size) // (cfg.bank.bank_stride or enc.stride) + 1
    real = min(
        cfg.bank.coreset_ratio * sel.info["train_images"] * side**2, cfg.bank.coreset_max_size
    )
    # half a row under the target, so that the bank's ceil(ratio · rows) is the target
    return min(1.0, (math.ceil(real) - 0.5) / max(rows, 1))


def _patch_scores(
    enc: PatchEncoder, sel: SelectionSet, cfg: MSPrayConfig, stride: int, device
) -> torch.Tensor:
    """Nearest-neighbour distance of every window patch (clean then anomalous, ``N×h×w``)
    to the coreset bank of the bank images; cached by the encoder's weights."""
    bank_cfg = cfg.bank.model_copy(update={"index": "flat", "use_gpu": False})
    weights = _digest(*enc.state_dict().values())
    key = (sel.key, stride, weights, enc.output_tanh, bank_cfg.model_dump_json())
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    queries = torch.cat([sel.clean, sel.anomalous])
    bank_step = (cfg.bank.bank_stride or enc.stride) // enc.stride
    bar = progress_bar(
        total=sel.bank_images.shape[0] + queries.shape[0],
        desc=f"selection scale {enc.patch_size}",
        unit="img",
        leave=False,
    )
    layout = resolve_memory_format(cfg.score.channels_last, device)
    # a copy in eval mode and the detector's layout: the model in training keeps its own
    scoring = copy.deepcopy(enc).eval().to(memory_format=layout)
    try:
        rows = _grid(scoring, sel.bank_images, bank_step, device, 8, bar, layout).flatten(0, 2)
        ratio = bank_ratio(cfg, enc, sel, rows.shape[0])
        bank_cfg = bank_cfg.model_copy(update={"coreset_ratio": ratio})
        bank = PatchBank.build(rows.numpy(), bank_cfg, seed=cfg.train.seed)  # as inference
        grid = _grid(scoring, queries, stride // enc.stride, device, 8, bar, layout)
    finally:
        bar.close()
    b, h, w, d = grid.shape
    # the detector's search (the exact cell search on CPU), not a dense faiss pass
    scores = search_bank(bank, grid.reshape(-1, d), bank_cfg, device).view(b, h, w).cpu()
    _CACHE[key] = scores
    while len(_CACHE) > CACHE_ENTRIES:
        _CACHE.popitem(last=False)
    return scores


def scale_maps(
    enc: PatchEncoder,
    sel: SelectionSet,
    cfg: MSPrayConfig,
    device: torch.device | str = "cpu",
    stride: int | None = None,
) -> torch.Tensor:
    """Raw pixel maps (``N×w×w``) of the clean then the anomalous windows at one scale
    (``stride``: default the config's inference stride): nearest-neighbour distance to the
    selection bank, spread over the pixels as at inference."""
    if stride is None:
        s = enc.patch_size
        stride = cfg.stride_for(s) if s in cfg.model.scales else enc.stride
    if stride % enc.stride:
        raise ValueError(f"stride {stride} is not a multiple of the network stride {enc.stride}")
    scores = _patch_scores(enc, sel, cfg, stride, device)
    return M.patch_scores_to_map(scores, enc.patch_size, stride, tuple(sel.clean.shape[-2:]))


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
    along. Returns the best name (the first on ties) and the table. Encoders already scored
    during training (same weights, same set) are not run again."""
    sel = SelectionSet.build(cfg, train_images, val_images)
    table: dict[str, dict] = {}
    for name, encoders in candidates.items():
        per = {s: scale_maps(e, sel, cfg, device) for s, e in encoders.items()}
        row = fused_metrics(per, sel, cfg)
        row["per_scale"] = {str(s): detection_metrics(m, sel, cfg) for s, m in per.items()}
        table[name] = row
    best = max(table, key=lambda n: table[n]["score"])  # max keeps the first of equals
    return best, table
