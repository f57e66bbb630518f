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
summaries (:class:`~mspray.decisions.summaries.MapSummary`), with the images scored on its
actor pool.
:func:`recalibrate` sets a deployed bundle's threshold from a batch of production images.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from mspray.config.run import progress_bar, use_run
from mspray.config.runs import CalibrateRun
from mspray.decisions import near_duplicates as ND
from mspray.decisions.fold_banks import FoldBankConfig, fold_banks
from mspray.decisions.near_duplicates import GAP_SAMPLE, gap_sample, near_duplicate_gap
from mspray.decisions.summaries import (
    MapSummary,
    calibrate,
    calibrate_from_summary,
    summarize_maps,
    summary_scores,
)
from mspray.decisions.threshold import (
    Calibration,
    expected_flags,
    order_statistic_threshold,
    trimmed_threshold,
    widen_promise,
)
from mspray.detector import Detector

log = logging.getLogger(__name__)


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


#: (positions in sorted-name order, scale) -> their bank embeddings at that scale, the
#: rows of each image together (``S·P×D``)
EmbedSample = Callable[[np.ndarray, int], np.ndarray]


def _content_duplicates(det: Detector, emb: torch.Tensor, scale: int) -> np.ndarray:
    return ND.near_duplicate_pairs(ND.share_matrix(emb, scale, det.bank_stride(scale)))


def plan_folds(
    det: Detector, n_images: int, embed: EmbedSample, in_bank: np.ndarray | None = None
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """The cross-calibration folds of ``n_images`` (sorted names) and what decided them.

    ``embed`` gives the coarsest-scale embeddings of the :func:`gap_sample` images. The gap
    (``score.calibration_gap``; None: measured, :func:`near_duplicate_gap`) leaves
    name-order neighbours out of a fold's bank. Near-duplicates are also found by content
    (:mod:`mspray.decisions.near_duplicates`), on the sampled images of a larger set: if some lie
    further apart in name order than the gap, the folds follow the content
    (:func:`mspray.decisions.near_duplicates.content_fold_plan`) when every image was compared; in a
    larger set, ``info["suspect_share"]`` estimates the share of images whose
    near-duplicates stay in their fold bank (the caller widens the promise by it).
    With ``in_bank``, content folds get smaller (more of them) until no fold bank is empty.
    """
    positions = gap_sample(n_images)
    scale = max(det.scales)
    flat = embed(positions, scale)
    emb = torch.from_numpy(flat).view(len(positions), -1, flat.shape[-1])
    folds, gap = det.cfg.score.calibration_folds, det.cfg.score.calibration_gap
    if gap is None:
        gap = near_duplicate_gap(emb, positions, n_images)
        log.info("cross-calibration: images up to %d apart look like near-duplicates", gap)
    info: dict = {"folds": folds, "gap": gap, "fold_order": "names"}
    if len(positions) <= 2:
        return fold_plan(n_images, folds, gap), info
    dup = _content_duplicates(det, emb, scale)
    info["near_duplicate_pairs"] = int(dup.sum() // 2)
    far = dup & (np.abs(positions[:, None] - positions[None, :]) > gap)
    if not far.any():
        return fold_plan(n_images, folds, gap), info
    if len(positions) < n_images:
        # partners of an image are seen in a sample of len(positions) - 1 of n_images - 1
        per_image = far.sum(1).mean() * (n_images - 1) / (len(positions) - 1)
        info["suspect_share"] = float(min(1.0, per_image))
        info["near_duplicates_sampled"] = len(positions)
        log.warning(
            "cross-calibration: %d near-duplicate pairs found by content among %d sampled "
            "images, apart in name order; %d images are too many to keep them all apart",
            info["near_duplicate_pairs"], len(positions), n_images,
        )  # fmt: skip
        return fold_plan(n_images, folds, gap), info
    log.info(
        "cross-calibration: %d near-duplicate pairs found by content, apart in name order; "
        "folds follow the content",
        info["near_duplicate_pairs"],
    )
    info["fold_order"] = "content"
    plan = ND.content_fold_plan(dup, folds, gap)
    while in_bank is not None and _empty_fold_bank(plan, in_bank) and len(plan) < n_images:
        folds = min(n_images, 2 * len(plan))  # smaller folds exclude fewer images
        plan = ND.content_fold_plan(dup, folds, gap)
    info["folds"] = len(plan)
    return plan, info


def image_embeddings(
    det: Detector,
    images: torch.Tensor,
    scales: tuple[int, ...],
    batch_size: int | None = None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per scale: the bank embeddings of ``images`` and the index of the image of each row
    (a stem the encoders share runs once per batch)."""
    with use_run(progress=False):  # called per fold and batch: no bar for each
        embeddings = det.bank_embeddings_batched(images, scales, batch_size)
    n = len(images)
    return {
        s: (emb, np.repeat(np.arange(n), emb.shape[0] // max(n, 1)))
        for s, emb in embeddings.items()
    }


def _empty_fold_bank(plan: list[tuple[np.ndarray, np.ndarray]], in_bank: np.ndarray) -> bool:
    return any(not np.delete(in_bank, excluded).any() for _, excluded in plan)


def check_fold_plan(plan: list[tuple[np.ndarray, np.ndarray]], in_bank: np.ndarray) -> None:
    """ValueError when some fold bank would be empty (too few bank images for the plan)."""
    if _empty_fold_bank(plan, in_bank):
        raise ValueError(
            f"{int(in_bank.sum())} bank images are too few for {len(plan)} folds with "
            "their gap and near-duplicates: a fold bank would be empty"
        )


def crossfit_summary(
    det: Detector,
    images: torch.Tensor,
    in_bank: np.ndarray,
    plan: list[tuple[np.ndarray, np.ndarray]],
    embeddings: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
    bank_config: FoldBankConfig | None = None,
    batch_size: int | None = None,
    timings: dict[str, float] | None = None,
) -> MapSummary:
    """Summaries (:class:`~mspray.decisions.summaries.MapSummary`, image order) of the raw maps of
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
        timings: gets the seconds of the fold banks (:func:`mspray.decisions.fold_banks.fold_banks`)
            and of scoring the folds (``fold_scoring_s``).
    """
    t = timings if timings is not None else {}
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
    t["fold_scoring_s"] = 0.0
    for scored, banks in fold_banks(det, plan, in_bank, embeddings, bank_config, t):
        order.append(scored)
        t0 = time.perf_counter()
        for i in range(0, len(scored), bs):
            x = images[torch.from_numpy(scored[i : i + bs])]
            parts.append(summarize_maps(det, det.raw_scale_maps(x, banks=banks)))
        t["fold_scoring_s"] += time.perf_counter() - t0
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

    t0 = time.perf_counter()
    plan, info = plan_folds(det, len(images), embed, in_bank)
    timings = {"plan_folds_s": time.perf_counter() - t0}
    summary = crossfit_summary(
        det, images, in_bank, plan, embeddings, bank_config, batch_size, timings
    )
    cal = calibrate_from_summary(
        det, summary.moments, lambda stats: summary_scores(det, summary.pooled, stats), "crossfit"
    )
    cal = widen_for_suspects(det, cal, info)
    info["timings"] = {k: round(v, 3) for k, v in timings.items()}
    log.info("cross-calibration timings: %s", info["timings"])
    det.meta["calibration"].update(info)
    return cal


def widen_for_suspects(det: Detector, cal: Calibration, info: dict) -> Calibration:
    """``cal``, widened (:func:`mspray.decisions.threshold.widen_promise`, logged, and in
    ``det.meta``) when ``info["suspect_share"]`` of the calibration images may have
    near-duplicates in the bank they were scored against."""
    share = float(info.get("suspect_share") or 0.0)
    if share <= 0:
        return cal
    why = info.get("suspect_why") or (
        f"near-duplicates by content in a sample of {info.get('near_duplicates_sampled')} "
        "images could not all be kept out of the fold banks"
    )
    cal = widen_promise(cal, math.ceil(share * cal.n), why)
    log.warning("calibration: %s", cal.extra["widened"])
    det.meta["calibration"] = cal.to_dict()
    det.meta["threshold_quantile"] = 1.0 - cal.promised_fpr
    return cal


def _holdout_suspects(det: Detector, images: torch.Tensor, in_bank: np.ndarray) -> dict:
    """Held-out calibration: the share of held-out images with a near-duplicate by content
    among the bank images (all of them when there are too many images to compare)."""
    held = np.flatnonzero(~in_bank)
    if len(images) > GAP_SAMPLE:
        return {"suspect_share": 1.0, "suspect_why": "too many images to look for overlap"}
    scale = max(det.scales)
    flat = image_embeddings(det, images, (scale,))[scale][0]
    dup = _content_duplicates(
        det, torch.from_numpy(flat).view(len(images), -1, flat.shape[-1]), scale
    )
    bad = int(dup[np.ix_(held, np.flatnonzero(in_bank))].any(1).sum())
    why = f"{bad} held-out images have near-duplicates by content in the bank"
    return {"suspect_share": bad / len(held), "suspect_why": why}


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
    fallback = None
    if det.cfg.score.calibration == "crossfit":
        try:
            return crossfit_calibrate(det, images, in_bank, embeddings, bank_config)
        except ValueError as e:
            fallback = f"cross-calibration not possible ({e}); calibrated on the held-out images"
            log.warning("%s", fallback)
    held_out = torch.from_numpy(np.flatnonzero(~in_bank))
    if len(held_out) == 0:
        return None
    cal = calibrate(det, images[held_out], source="holdout")
    if fallback is None:  # held-out calibration was asked for
        return cal
    # the mode known to understate: never silently, and widened by its suspect images
    info = {"fallback": fallback, **_holdout_suspects(det, images, in_bank)}
    cal = widen_for_suspects(det, cal, info)
    det.meta["calibration"].update(info)
    det.meta["calibration"]["warning"] = "; ".join(w for w in (fallback, cal.warning) if w)
    return cal


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
    anomalous: :func:`mspray.decisions.threshold.trimmed_threshold`. Stats and banks are kept, so
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


def recalibrate_bundle(run: CalibrateRun) -> tuple[str, Calibration]:
    """Score every image under ``run.input`` with ``run.bundle`` on ``run.device``,
    recalibrate for ``run``'s promise (see :func:`recalibrate`) and save the result as a new
    version under ``run.out`` (default: the bundle's own root, whose ``latest`` then names
    it; the version it came from is kept as is). Returns ``(new version URI, calibration)``."""
    from mspray import storage
    from mspray.artifacts.bundle import bundle_root, load_bundle, resolve_bundle, save_bundle
    from mspray.data.images import load_images
    from mspray.device import resolve_device

    source = resolve_bundle(run.bundle)
    out = run.out or bundle_root(run.bundle)
    det = load_bundle(source, device=resolve_device(run.device))
    uris = storage.list_files(storage.normalize(run.input))
    if not uris:
        raise ValueError(f"no images under {run.input}")
    size, bs = det.cfg.model.image_size, det.cfg.score.batch_size
    chunk = max(bs, 256)  # bounds memory on big batches
    parts = []
    for i in progress_bar(range(0, len(uris), chunk), desc="scoring"):
        with use_run(progress=False):  # the bar above counts the chunks
            images = load_images(uris[i : i + chunk], size)
        parts.append(score_images(det, images, bs))
    scores = np.concatenate(parts)
    log.info("scored %d production images from %s", len(uris), run.input)
    cal = recalibrate(
        det,
        scores,
        normal=run.normal,
        expected_anomaly_rate=run.expected_anomaly_rate,
        target_fpr=run.target_fpr,
        input_uri=run.input,
    )
    det.meta["recalibrated_from"] = {"bundle": source, "version": det.version}
    return save_bundle(det, out), cal
