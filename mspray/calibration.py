"""Calibration scores that look like scores of new normal images, and recalibration.

Held-out images scored against the full bank understate the scores of new normal images
when they have near-duplicates in the bank (consecutive frames of a fixed camera, crops that
overlap): the threshold then sits too low and flags most new normal images. Cross-fitting
scores every normal image against a bank built WITHOUT its fold; folds are contiguous blocks
of the sorted file names (consecutive frames share a fold), and ``gap`` more images on each
side of a fold are left out of its bank too, so a frame's neighbour in the next block does
not stand in for it.

:func:`crossfit_calibrate` is the one core function for the in-process fit
(:func:`mspray.fit.fit_detector`) and the Ray Data bank builder (it runs on the driver there,
from the embeddings the actors computed). :func:`recalibrate` sets a deployed bundle's
threshold from a batch of production images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from mspray.bank import PatchBank
from mspray.config import BankConfig
from mspray.detector import Detector
from mspray.threshold import (
    Calibration,
    expected_flags,
    order_statistic_threshold,
    trimmed_threshold,
)

log = logging.getLogger(__name__)

#: (scale, images in the fold bank, embedding rows given) -> bank config of a fold bank
FoldBankConfig = Callable[[int, int, int], BankConfig]


def fold_plan(n_images: int, folds: int, gap: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each fold of ``n_images`` (in sorted-name order): ``(scored, excluded)`` indices,
    the fold itself (a contiguous block) and the images left out of its bank (the fold plus
    ``gap`` images on each side)."""
    if n_images < 2:
        raise ValueError(f"cross-calibration needs at least 2 images, got {n_images}")
    folds = min(folds, n_images)
    plan = []
    for block in np.array_split(np.arange(n_images), folds):
        lo, hi = max(0, int(block[0]) - gap), min(n_images, int(block[-1]) + 1 + gap)
        plan.append((block, np.arange(lo, hi)))
    return plan


def near_duplicate_gap(
    det: Detector,
    images: torch.Tensor,
    max_gap: int = 32,
    ratio: float = 0.9,
    batch_size: int | None = None,
) -> int:
    """How many images apart (in name order) images are still near-duplicates.

    For each distance d, how close image i+d comes to image i: the 10 % quantile over i's
    patches of the distance to the nearest patch of i+d (coarsest scale, bank stride; low
    when i+d holds copies of a tenth of i's patches), median over i. d counts as
    near-duplicate while that is below ``ratio`` times the same figure for images half the
    set apart. 0 for independent images (e.g. MVTec); consecutive overlapping frames give
    about the number of frames that share whole patches with one frame.
    """
    n = len(images)
    max_gap = min(max_gap, n // 4)
    if max_gap < 1:
        return 0
    bs = batch_size or det.cfg.score.batch_size
    flat, _ = image_embeddings(det, images, max(det.scales), bs)
    emb = torch.from_numpy(flat).view(n, -1, flat.shape[-1])  # N×P×D

    def closeness(i: np.ndarray, j: np.ndarray) -> float:
        d = [
            torch.quantile(torch.cdist(emb[i[k : k + bs]], emb[j[k : k + bs]]).amin(-1), 0.1, -1)
            for k in range(0, len(i), bs)
        ]
        return float(torch.cat(d).median())

    idx = np.arange(n)
    far = closeness(idx, (idx + n // 2) % n)
    gap = 0
    for d in range(1, max_gap + 1):
        if closeness(idx[: n - d], idx[d:]) >= ratio * far:
            break
        gap = d
    return gap


def image_embeddings(
    det: Detector, images: torch.Tensor, scale: int, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Bank embeddings of ``images`` at ``scale`` and the index of the image of each row."""
    bs = batch_size or det.cfg.score.batch_size
    emb = np.concatenate(
        [det.bank_embeddings(images[i : i + bs], scale) for i in range(0, len(images), bs)]
    )
    return emb, np.repeat(np.arange(len(images)), emb.shape[0] // max(len(images), 1))


def crossfit_maps(
    det: Detector,
    images: torch.Tensor,
    in_bank: np.ndarray,
    gap: int,
    embeddings: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
    bank_config: FoldBankConfig | None = None,
    batch_size: int | None = None,
) -> dict[int, torch.Tensor]:
    """Raw per-scale maps (``N×H×W``) of every normal image, each scored against a bank
    built from the bank images outside its fold and ``gap`` images either side of it (see
    :func:`fold_plan`).

    Args:
        images: all normal images, ``N×3×H×W``, in sorted-name order.
        in_bank: ``N`` bools, which images the deployed bank is built from (held-out
            images are scored but never in a bank).
        embeddings: per scale ``(rows, image index of each row)`` of the bank images (index
            into ``images``), e.g. from Ray Data actors; computed here when None.
        bank_config: bank config of a fold bank (default: the detector's); the Ray path
            adjusts the coreset ratio for per-shard reduced rows.
    """
    cfg = det.cfg
    in_bank = np.asarray(in_bank, bool)
    if in_bank.shape != (len(images),):
        raise ValueError(f"in_bank: expected {len(images)} flags, got shape {in_bank.shape}")
    plan = fold_plan(len(images), cfg.score.calibration_folds, gap)
    for _, excluded in plan:
        if not np.delete(in_bank, excluded).any():
            raise ValueError(
                f"{int(in_bank.sum())} bank images are too few for "
                f"{cfg.score.calibration_folds} folds with gap {gap}: "
                "a fold bank would be empty"
            )
    bs = batch_size or cfg.score.batch_size
    bank_index = np.flatnonzero(in_bank)
    out: dict[int, torch.Tensor] = {}
    for scale in det.scales:
        if embeddings is not None:
            emb, owner = embeddings[scale]
        else:
            emb, local = image_embeddings(det, images[bank_index], scale, bs)
            owner = bank_index[local]
        maps = torch.empty(len(images), *images.shape[-2:])
        for scored, excluded in plan:
            keep = ~np.isin(owner, excluded)
            n_imgs = int(np.delete(in_bank, excluded).sum())
            bcfg = bank_config(scale, n_imgs, int(keep.sum())) if bank_config else cfg.bank
            bank = PatchBank.build(emb[keep], bcfg, seed=cfg.train.seed)
            for i in range(0, len(scored), bs):
                idx = torch.from_numpy(scored[i : i + bs])
                maps[idx] = det.scale_map(images[idx], scale, bank)
        out[scale] = maps
    return out


def crossfit_calibrate(
    det: Detector,
    images: torch.Tensor,
    in_bank: np.ndarray,
    embeddings: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
    bank_config: FoldBankConfig | None = None,
    batch_size: int | None = None,
) -> Calibration:
    """Stats and threshold of ``det`` from cross-fitted maps of all its normal images (see
    :func:`crossfit_maps` for the arguments); the deployed banks are not touched."""
    gap = det.cfg.score.calibration_gap
    if gap is None:
        gap = near_duplicate_gap(det, images, batch_size=batch_size)
        log.info("cross-calibration: images up to %d apart look like near-duplicates", gap)
    raw = crossfit_maps(det, images, in_bank, gap, embeddings, bank_config, batch_size)
    cal = det.calibrate_from_maps(raw, "crossfit", batch_size)
    det.meta["calibration"].update(folds=det.cfg.score.calibration_folds, gap=gap)
    return cal


def calibrate_normal_images(
    det: Detector,
    images: torch.Tensor,
    in_bank: np.ndarray,
    embeddings: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
    bank_config: FoldBankConfig | None = None,
) -> Calibration | None:
    """Calibrate ``det`` the configured way (``score.calibration``) from its normal images
    (sorted-name order; ``in_bank`` marks the bank ones). Falls back to the held-out images
    when there are too few images to cross-fit; None when there is nothing to calibrate on."""
    in_bank = np.asarray(in_bank, bool)
    if det.cfg.score.calibration == "crossfit":
        try:
            return crossfit_calibrate(det, images, in_bank, embeddings, bank_config)
        except ValueError as e:
            log.warning("cross-calibration not possible (%s); using the held-out images", e)
    held_out = torch.from_numpy(np.flatnonzero(~in_bank))
    if len(held_out) == 0:
        return None
    return det.calibrate(images[held_out], source="holdout")


def score_images(det: Detector, images: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
    """Image scores of ``images`` (``N×3×H×W``) with the detector's banks and stats."""
    bs = batch_size or det.cfg.score.batch_size
    return torch.cat(
        [det.predict(images[i : i + bs]).image_scores for i in range(0, len(images), bs)]
    ).numpy()


def recalibrate(
    det: Detector,
    scores: np.ndarray,
    *,
    normal: bool | None = None,
    expected_anomaly_rate: float | None = None,
    target_fpr: float | None = None,
    input_uri: str | None = None,
) -> Calibration:
    """Set ``det``'s threshold from the image scores of a batch of production images.

    Without ``expected_anomaly_rate`` (``normal`` may say so explicitly) all of them are
    normal: the order statistic for ``target_fpr`` (default ``score.target_fpr``). With
    ``expected_anomaly_rate`` R (``normal`` then not True), at most a fraction R is
    anomalous: :func:`mspray.threshold.trimmed_threshold`. Stats and banks are kept, so
    scores stay comparable with the old bundle; only the decision moves.

    ``meta["calibration"]`` gets the new promise and a ``production_check``: how many of
    the batch the PREVIOUS threshold flagged against what it promised (for all-normal
    batches, the promised count interval says whether the old threshold held).
    """
    scores = np.asarray(scores, np.float64).ravel()
    if scores.size == 0:
        raise ValueError("no production images were scored")
    if (expected_anomaly_rate is None and normal is False) or (
        expected_anomaly_rate is not None and normal
    ):
        raise ValueError("give exactly one of normal=True or expected_anomaly_rate")
    normal = expected_anomaly_rate is None
    score_cfg = det.cfg.score
    target = target_fpr if target_fpr is not None else score_cfg.target_fpr
    conf = score_cfg.fpr_confidence
    previous = det.meta.get("calibration")
    check: dict = {"n_images": int(scores.size), "previous_threshold": det.threshold}
    if det.threshold is not None:
        flagged = int((scores > det.threshold).sum())
        check.update(flagged=flagged, observed_flag_rate=flagged / scores.size)
        if previous:
            check["previous_promised_fpr"] = previous.get("promised_fpr")
            check["previous_fpr_interval"] = previous.get("fpr_interval")
            if normal and previous.get("rank") is not None:
                lo, hi = expected_flags(previous, scores.size)
                check["previous_expected_flags"] = [lo, hi]
                check["previous_promise_held"] = lo <= flagged <= hi
    if normal:
        cal = order_statistic_threshold(scores, target, conf, source="production")
    else:
        cal = trimmed_threshold(scores, expected_anomaly_rate, target, conf, source="production")
    if cal.warning:
        log.warning("recalibration: %s", cal.warning)
    new = cal.to_dict()
    new.update(
        production_check=check,
        input=input_uri,
        expected_anomaly_rate=expected_anomaly_rate,
        recalibrated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    history = list(det.meta.get("calibration_history", []))
    if previous:
        history.append(previous)
    det.threshold = cal.threshold
    det.meta.update(calibration=new, calibration_history=history)
    return cal


def recalibrate_bundle(
    bundle: str,
    input_uri: str,
    out: str | None = None,
    *,
    normal: bool | None = None,
    expected_anomaly_rate: float | None = None,
    target_fpr: float | None = None,
    device: str = "auto",
    progress: bool = True,
) -> tuple[str, Calibration]:
    """Score every image under ``input_uri`` with ``bundle``, recalibrate (see
    :func:`recalibrate`) and save the result as a new version under ``out`` (default: the
    bundle's own root, whose ``latest`` then names it; the version it came from is kept
    as is). Returns ``(new version URI, calibration)``."""
    from mspray import storage
    from mspray.bundle import bundle_root, load_bundle, resolve_bundle, save_bundle
    from mspray.data.images import load_images
    from mspray.device import resolve_device

    source = resolve_bundle(bundle)
    out = out or bundle_root(bundle)
    det = load_bundle(source, device=resolve_device(device))
    uris = storage.list_files(storage.normalize(input_uri))
    if not uris:
        raise ValueError(f"no images under {input_uri}")
    from tqdm.auto import tqdm

    size, bs = det.cfg.model.image_size, det.cfg.score.batch_size
    chunk = max(bs, 256)  # bounds memory on big batches
    scores = np.concatenate(
        [
            score_images(det, load_images(uris[i : i + chunk], size, progress=False), bs)
            for i in tqdm(range(0, len(uris), chunk), desc="scoring", disable=not progress)
        ]
    )
    log.info("scored %d production images from %s", len(uris), input_uri)
    cal = recalibrate(
        det,
        scores,
        normal=normal,
        expected_anomaly_rate=expected_anomaly_rate,
        target_fpr=target_fpr,
        input_uri=input_uri,
    )
    det.meta["recalibrated_from"] = {"bundle": source, "version": det.version}
    return save_bundle(det, out), cal
