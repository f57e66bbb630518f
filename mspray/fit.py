"""Fit a detector on normal images: train every scale, build banks, calibrate, save.

The scale training step is pluggable: plain torch on one process by default, or the Ray
Train adapter (``mspray.ray.train``) when the config asks for workers.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable

import numpy as np
import torch

from mspray.calibration import calibrate_normal_images
from mspray.config import MSPrayConfig
from mspray.data.images import load_images
from mspray.detector import Detector
from mspray.device import resolve_device
from mspray.model.backbone import PretrainedWeightsError, load_vgg16_state
from mspray.model.multiscale import (
    MultiScaleEncoder,
    ScaleModel,
    build_scale_model,
    stem_scale,
    stem_state,
    training_order,
)
from mspray.train.loop import train_scale
from mspray.train.recipes import no_imagenet_defaults
from mspray.train.selection import fused_choice

log = logging.getLogger(__name__)

#: (cfg, train_uris, val_uris) -> {scale: trained ScaleModel}
ScaleTrainFn = Callable[[MSPrayConfig, list[str], list[str]], dict[int, ScaleModel]]


def split_holdout(paths: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split of normal training images into (train, held-out validation).

    At least one image is held out whenever there are two or more and ``fraction > 0``: the
    held-out images select the checkpoint and calibrate the threshold, so they must not be
    in the bank.
    """
    paths = sorted(paths)
    n_val = 0 if fraction <= 0 or len(paths) < 2 else max(1, math.floor(fraction * len(paths)))
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    val = sorted(paths[i] for i in order[:n_val])
    train = sorted(paths[i] for i in order[n_val:])
    return train, val


def backbone_state(cfg: MSPrayConfig) -> tuple[dict | None, bool]:
    """ImageNet VGG16 weights when the config asks for them: (state or None, loaded?)."""
    if not cfg.model.pretrained:
        return None, False
    try:
        return load_vgg16_state(cfg.model.weights_path), True
    except PretrainedWeightsError as e:
        if not cfg.model.pretrained_fallback:
            raise
        log.warning(
            "ImageNet weights unavailable (%s); training from random init. "
            "Set model.pretrained_fallback=false to make this an error.",
            e,
        )
        return None, False


def local_scale_trainer(
    cfg: MSPrayConfig,
    train: torch.Tensor,
    val: torch.Tensor | None,
    state: dict | None,
    progress: bool = True,
) -> dict[int, ScaleModel]:
    """Train every scale one after another on this process (the shared stem's scale first,
    the others from its trained stem)."""
    models, stem = {}, None
    for scale in training_order(cfg):
        models[scale], history = train_scale(cfg, scale, train, val, state, progress, stem)
        if scale == stem_scale(cfg):
            stem = stem_state(models[scale])
        if history:
            last = history[-1]
            log.info(
                "scale %d: loss %.4f, epoch %d selected (%s)",
                scale,
                last["loss"],
                last["best_epoch"],
                cfg.train.selection,
            )
    return models


def fit_detector(
    cfg: MSPrayConfig,
    image_uris: list[str],
    out: str | None = None,
    trainer: ScaleTrainFn | None = None,
    progress: bool = True,
    build_banks: bool = True,
) -> Detector:
    """Train on normal ``image_uris``; build banks from the training split; calibrate the
    threshold (``score.calibration``: cross-fitted over all images, or the held-out split);
    save a bundle to ``out`` when given.

    With ``build_banks=False`` only the encoders are trained and saved: a version without
    banks, which ``latest`` never names (consumers of ``out`` keep its previous complete
    version). The Ray Data bank builder (``mspray build-bank --bundle <version URI>``) then
    embeds the images on an actor pool, builds the banks, calibrates and saves a complete
    version, which becomes ``latest``.
    """
    if not image_uris:
        raise ValueError("no training images")
    train_uris, val_uris = split_holdout(image_uris, cfg.train.val_fraction, cfg.train.seed)
    size = cfg.model.image_size
    state, loaded = backbone_state(cfg)
    cfg = no_imagenet_defaults(cfg, loaded)  # a random-init trunk trains with its own lr
    local = trainer is None or build_banks
    train = (
        load_images(train_uris, size, progress=progress, desc="loading train images")
        if local
        else None
    )
    val = load_images(val_uris, size, progress=False) if local and val_uris else None
    if trainer is None:
        models = local_scale_trainer(cfg, train, val, state, progress)
    else:
        models = trainer(cfg, train_uris, val_uris)
    selection = None
    if cfg.train.selection == "synthetic" and val is not None and cfg.train.epochs > 0:
        # the fused detector must not lose to the untrained encoders either (per-scale
        # choices need not add up); the untrained ones are rebuilt from the same seed
        untrained = {s: build_scale_model(cfg, s, state) for s in cfg.model.scales}
        pick, table = fused_choice(
            cfg,
            {"selected": {s: m.encoder for s, m in models.items()},
             "untrained": {s: m.encoder for s, m in untrained.items()}},
            train, val, resolve_device(cfg.train.device),
        )  # fmt: skip
        selection = {"fused": table, "choice": pick}
        log.info("fused synthetic-anomaly check: %s kept (%s)", pick, table[pick]["score"])
        if pick == "untrained":
            for s, m in untrained.items():
                m.train_summary = getattr(models[s], "train_summary", None)
            models = untrained
    det = Detector(cfg, MultiScaleEncoder(cfg, models), device=resolve_device(cfg.train.device))
    if build_banks:
        det.build_banks(train, progress=progress)
        # all normal images in sorted-name order (cross-calibration folds are name blocks)
        names = train_uris + val_uris
        order = np.argsort(names, kind="stable")
        images = train if val is None else torch.cat([train, val])
        in_bank = order < len(train_uris)
        if calibrate_normal_images(det, images[torch.from_numpy(order)], in_bank) is None:
            log.warning(
                "no normal image outside the bank to calibrate on (too few images, or "
                "calibration='holdout' with val_fraction=0): calibrating the threshold on "
                "the bank images (the threshold will be low)"
            )
            det.calibrate(train, source="bank")
    det.meta.update(
        pretrained_loaded=loaded,
        n_train_images=len(train_uris),
        n_holdout_images=len(val_uris),
        # Per scale: epochs and steps run, why training stopped, the selected epoch, history.
        training={str(s): getattr(m, "train_summary", None) for s, m in models.items()},
        selection=selection,  # fused: selected vs untrained encoders on synthetic anomalies
    )
    if out:
        from mspray.bundle import save_bundle

        save_bundle(det, out)
    return det
