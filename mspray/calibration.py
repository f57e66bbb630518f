"""Calibration scores that look like scores of new normal images, and recalibration.

Held-out images scored against the full bank understate the scores of new normal images
when they have near-duplicates in the bank (consecutive frames of a fixed camera, crops that
overlap): the threshold then sits too low and flags most new normal images. Cross-fitting
scores every normal image against a bank built WITHOUT its fold; folds are contiguous blocks
of the sorted file names (consecutive frames share a fold), and ``gap`` more images on each
side of a fold are left out of its bank too, so a frame's neighbour in the next block does
not stand in for it.

:func:`crossfit_calibrate` is the in-process fit's (:func:`mspray.pipeline.steps.fit_detector`); the
Ray Data bank builder (:mod:`mspray.ray.data.calibration`) runs the same steps, the fold
plan (:func:`fold_plan`), the fold banks (:func:`fold_banks`) and the per-image map
summaries (:class:`~mspray.detector.MapSummary`), with the images scored on its actor pool.
:func:`recalibrate` sets a deployed bundle's threshold from a batch of production images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from mspray import near_duplicates as ND
from mspray.bank import PatchBank
from mspray.config import BankConfig
from mspray.detector import Detector, MapSummary
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


#: The near-duplicate gap is measured on all images of a set up to this size, and on this
#: many (in :data:`GAP_RUNS` evenly spaced runs of consecutive names) of a larger one, so
#: its cost and memory stay bounded however many normal images there are. Near-duplicates
#: by content (:mod:`mspray.near_duplicates`) are looked for when all images are sampled.
GAP_SAMPLE = 512
GAP_RUNS = 4


def gap_sample(n_images: int) -> np.ndarray:
    """Positions (in sorted-name order) of the images :func:`near_duplicate_gap` looks at:
    all of them, or :data:`GAP_RUNS` runs of consecutive images, the runs evenly spaced so
    that each has a partner run half the set further on."""
    if n_images <= GAP_SAMPLE:
        return np.arange(n_images)
    starts = np.arange(GAP_RUNS) * (n_images // GAP_RUNS)
    return (starts[:, None] + np.arange(GAP_SAMPLE // GAP_RUNS)[None, :]).ravel()


def near_duplicate_gap(
    emb: torch.Tensor,
    positions: np.ndarray,
    n_images: int,
    max_gap: int = 32,
    ratio: float = 0.9,
    batch_size: int = 8,
) -> int:
    """How many images apart (in name order) images are still near-duplicates.

    ``emb`` (``S×P×D``) holds the patch embeddings (coarsest scale, bank stride) of the
    images at ``positions`` (:func:`gap_sample`) of a set of ``n_images``. For each distance
    d, how close image i+d comes to image i: the 10 % quantile over i's patches of the
    distance to the nearest patch of i+d (low when i+d holds copies of a tenth of i's
    patches), median over the sampled pairs. d counts as near-duplicate while that is below
    ``ratio`` times the same figure for images half the set apart. 0 for independent images
    (e.g. MVTec); consecutive overlapping frames give about the number of frames that share
    whole patches with one frame.
    """
    positions = np.asarray(positions, np.int64)
    max_gap = min(max_gap, len(positions) // 4)
    if max_gap < 1:
        return 0
    row = np.full(n_images, -1, np.int64)
    row[positions] = np.arange(len(positions))

    def closeness(offset: int, wrap: bool) -> float:
        j = positions + offset
        j = j % n_images if wrap else j
        ok = j < n_images
        ok[ok] = row[j[ok]] >= 0  # pairs whose both images were sampled
        a, b = row[positions[ok]], row[j[ok]]
        d = [
            torch.quantile(
                torch.cdist(emb[a[k : k + batch_size]], emb[b[k : k + batch_size]]).amin(-1),
                0.1,
                -1,
            )
            for k in range(0, len(a), batch_size)
        ]
        return float(torch.cat(d).median())

    sampled = len(positions) < n_images
    half = (GAP_RUNS // 2) * (n_images // GAP_RUNS) if sampled else n_images // 2
    far = closeness(half, wrap=True)
    gap = 0
    for d in range(1, max_gap + 1):
        if closeness(d, wrap=False) >= ratio * far:
            break
        gap = d
    return gap


#: (positions in sorted-name order, scale) -> their bank embeddings at that scale, the
#: rows of each image together (``S·P×D``)
EmbedSample = Callable[[np.ndarray, int], np.ndarray]


def plan_folds(
    det: Detector, n_images: int, embed: EmbedSample
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """The cross-calibration folds of ``n_images`` (sorted names) and what decided them.

    ``embed`` gives the coarsest-scale embeddings of the :func:`gap_sample` images. The gap
    (``score.calibration_gap``; None: measured, :func:`near_duplicate_gap`) leaves
    name-order neighbours out of a fold's bank. When every image was sampled,
    near-duplicates are also found by content; if some lie further apart in name order
    than the gap, the folds follow the content
    (:func:`mspray.near_duplicates.content_fold_plan`)."""
    positions = gap_sample(n_images)
    flat = embed(positions, max(det.scales))
    emb = torch.from_numpy(flat).view(len(positions), -1, flat.shape[-1])
    folds, gap = det.cfg.score.calibration_folds, det.cfg.score.calibration_gap
    if gap is None:
        gap = near_duplicate_gap(emb, positions, n_images)
        log.info("cross-calibration: images up to %d apart look like near-duplicates", gap)
    info: dict = {"folds": folds, "gap": gap, "fold_order": "names"}
    if len(positions) == n_images and n_images > 2:
        dup = ND.near_duplicate_pairs(ND.closeness_matrix(emb))
        info["near_duplicate_pairs"] = int(dup.sum() // 2)
        if ND.needs_content_folds(dup, gap):
            log.info(
                "cross-calibration: %d near-duplicate pairs found by content, apart in name "
                "order; folds follow the content",
                info["near_duplicate_pairs"],
            )
            info["fold_order"] = "content"
            return ND.content_fold_plan(dup, folds, gap), info
    return fold_plan(n_images, folds, gap), info


def image_embeddings(
    det: Detector,
    images: torch.Tensor,
    scales: tuple[int, ...],
    batch_size: int | None = None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per scale: the bank embeddings of ``images`` and the index of the image of each row
    (a stem the encoders share runs once per batch)."""
    embeddings = det.bank_embeddings_batched(images, scales, batch_size)
    n = len(images)
    return {
        s: (emb, np.repeat(np.arange(n), emb.shape[0] // max(n, 1)))
        for s, emb in embeddings.items()
    }


def check_fold_plan(plan: list[tuple[np.ndarray, np.ndarray]], in_bank: np.ndarray) -> None:
    """ValueError when some fold bank would be empty (too few bank images for the plan)."""
    for _, excluded in plan:
        if not np.delete(in_bank, excluded).any():
            raise ValueError(
                f"{int(in_bank.sum())} bank images are too few for {len(plan)} folds with "
                "their gap: a fold bank would be empty"
            )


def fold_banks(
    det: Detector,
    plan: list[tuple[np.ndarray, np.ndarray]],
    in_bank: np.ndarray,
    embeddings: dict[int, tuple[np.ndarray, np.ndarray]],
    bank_config: FoldBankConfig | None = None,
) -> Iterator[tuple[np.ndarray, dict[int, PatchBank]]]:
    """For each fold of ``plan``: the images it scores and its banks (every scale), built
    from the ``embeddings`` (per scale: rows, image index of each row) of the bank images
    outside the fold's excluded range, with the detector's bank config (or
    ``bank_config(scale, images in the fold bank, rows given)``). One fold at a time."""
    for scored, excluded in plan:
        n_imgs = int(np.delete(in_bank, excluded).sum())
        banks = {}
        for scale in det.scales:
            emb, owner = embeddings[scale]
            keep = ~np.isin(owner, excluded)
            bcfg = bank_config(scale, n_imgs, int(keep.sum())) if bank_config else det.cfg.bank
            banks[scale] = PatchBank.build(emb[keep], bcfg, seed=det.cfg.train.seed)
        yield scored, banks


def crossfit_summary(
    det: Detector,
    images: torch.Tensor,
    in_bank: np.ndarray,
    plan: list[tuple[np.ndarray, np.ndarray]],
    embeddings: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
    bank_config: FoldBankConfig | None = None,
    batch_size: int | None = None,
) -> MapSummary:
    """Summaries (:class:`~mspray.detector.MapSummary`, image order) of the raw maps of
    every normal image, each scored against banks built from the bank images its fold does
    not exclude (``plan``: :func:`plan_folds`).

    Args:
        images: all normal images, ``N×3×H×W``, in sorted-name order.
        in_bank: ``N`` bools, which images the deployed bank is built from (held-out
            images are scored but never in a bank).
        embeddings: per scale ``(rows, image index of each row)`` of the bank images (index
            into ``images``), e.g. from Ray Data actors; computed here when None.
        bank_config: bank config of a fold bank (default: the detector's); the Ray path
            adjusts the coreset ratio for per-shard reduced rows.
    """
    in_bank = np.asarray(in_bank, bool)
    if in_bank.shape != (len(images),):
        raise ValueError(f"in_bank: expected {len(images)} flags, got shape {in_bank.shape}")
    check_fold_plan(plan, in_bank)
    bs = batch_size or det.cfg.score.batch_size
    if embeddings is None:
        bank_index = np.flatnonzero(in_bank)
        per_scale = image_embeddings(det, images[bank_index], det.scales, bs)
        embeddings = {s: (emb, bank_index[local]) for s, (emb, local) in per_scale.items()}
    parts, order = [], []
    for scored, banks in fold_banks(det, plan, in_bank, embeddings, bank_config):
        order.append(scored)
        for i in range(0, len(scored), bs):
            x = images[torch.from_numpy(scored[i : i + bs])]
            parts.append(det.summarize_maps(det.raw_scale_maps(x, banks=banks)))
    # back to image order (content folds are not contiguous in it)
    return MapSummary.concat(parts).take(np.argsort(np.concatenate(order), kind="stable"))


def crossfit_calibrate(
    det: Detector,
    images: torch.Tensor,
    in_bank: np.ndarray,
    embeddings: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
    bank_config: FoldBankConfig | None = None,
    batch_size: int | None = None,
) -> Calibration:
    """Stats and threshold of ``det`` from cross-fitted maps of all its normal images (see
    :func:`crossfit_summary` for the arguments); the deployed banks are not touched."""

    def embed(positions: np.ndarray, scale: int) -> np.ndarray:
        picked = images[torch.from_numpy(positions)]
        return image_embeddings(det, picked, (scale,), batch_size)[scale][0]

    plan, info = plan_folds(det, len(images), embed)
    summary = crossfit_summary(det, images, in_bank, plan, embeddings, bank_config, batch_size)
    cal = det.calibrate_from_summary(
        summary.moments, lambda stats: det.summary_scores(summary.pooled, stats), "crossfit"
    )
    det.meta["calibration"].update(info)
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
