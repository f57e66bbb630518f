"""Evaluate a detector on a labelled test set: the metrics JSON of the CLI contract."""

from __future__ import annotations

import time
from pathlib import PurePosixPath

import numpy as np
import torch

from mspray import storage, viz
from mspray.config.run import progress_bar
from mspray.data.datasets import Sample
from mspray.data.images import load_image, load_mask
from mspray.decisions.threshold import expected_flags
from mspray.detector import Detector, stage_seconds_per_image
from mspray.evaluation.metrics import compute_metrics, image_auroc


def score_chunk(
    det: Detector, samples: list[Sample], with_masks: bool, maps_dir: str | None = None
) -> dict[str, np.ndarray]:
    """Load and score one chunk of test samples (the unit of both evaluation paths).

    Returns ``score``, ``score_<scale>``, ``seconds`` (the chunk's model time spread over its
    images), ``stage_<name>`` (seconds per stage, decode included, spread likewise) and, when
    ``with_masks``, ``map`` (float16: halves memory, metrics only rank values) and ``mask``.
    Writes overlay panels to ``maps_dir`` when given.
    """
    size = det.cfg.model.image_size
    t0 = time.perf_counter()
    images = torch.stack(
        [load_image(s.path, size, det.cfg.score.max_image_pixels) for s in samples]
    )
    timings = {"decode": time.perf_counter() - t0}
    t0 = time.perf_counter()
    pred = det.predict(images, timings)
    seconds = time.perf_counter() - t0
    masks = [load_mask(s.mask_path if s.label else None, size) for s in samples]
    if maps_dir:
        _write_overlays(maps_dir, samples, images, pred.maps, masks if with_masks else None, det)
    out = {
        "score": pred.image_scores.numpy().astype(np.float32),
        "seconds": np.full(len(samples), seconds / len(samples)),
    }
    for s in det.scales:
        out[f"score_{s}"] = pred.scale_scores[s].numpy().astype(np.float32)
    for stage, v in timings.items():
        out[f"stage_{stage}"] = np.full(len(samples), v / len(samples))
    if with_masks:
        out["map"] = pred.maps.half().numpy()
        out["mask"] = torch.stack(masks).numpy()
    return out


class EvalGather:
    """Collects :func:`score_chunk` results by sample index, in any order, into the
    metrics JSON (:meth:`report`)."""

    def __init__(self, samples: list[Sample], scales: tuple[int, ...], size: int) -> None:
        n = len(samples)
        self.samples = samples
        self.with_masks = has_masks(samples)
        self.scores = np.zeros(n, np.float32)
        self.scale_scores = {s: np.zeros(n, np.float32) for s in scales}
        self.maps = np.zeros((n, size, size), np.float16) if self.with_masks else None
        self.masks = np.zeros((n, size, size), np.uint8) if self.with_masks else None
        self.seen = np.zeros(n, bool)
        self.seconds = 0.0
        self.scales = tuple(scales)
        self.stages: dict[str, float] = {}

    def add(self, idx: np.ndarray, chunk: dict[str, np.ndarray]) -> None:
        self.seen[idx] = True
        self.scores[idx] = chunk["score"]
        for s, v in self.scale_scores.items():
            v[idx] = chunk[f"score_{s}"]
        if self.with_masks:
            self.maps[idx] = chunk["map"]
            self.masks[idx] = chunk["mask"]
        self.seconds += float(np.sum(chunk["seconds"]))
        for key, v in chunk.items():
            if key.startswith("stage_"):
                self.stages[key[6:]] = self.stages.get(key[6:], 0.0) + float(np.sum(v))

    def report(
        self, threshold: float | None, version: str | None, calibration: dict | None = None
    ) -> dict:
        if not self.seen.all():
            raise RuntimeError(f"{int((~self.seen).sum())} test images got no score")
        report = metrics_report(
            np.array([s.label for s in self.samples]),
            self.scores,
            self.scale_scores,
            self.masks,
            self.maps.astype(np.float32) if self.maps is not None else None,
            threshold=threshold,
            version=version,
            model_seconds=self.seconds,
            calibration=calibration,
        )
        # where the time goes, decode included (seconds_per_image counts the model only)
        report["stage_seconds_per_image"] = stage_seconds_per_image(
            self.stages, len(self.samples), self.scales
        )
        return report


def has_masks(samples: list[Sample]) -> bool:
    """Whether pixel metrics can be computed (some anomalous sample has a mask)."""
    return any(s.mask_path for s in samples if s.label == 1)


def evaluate(
    det: Detector,
    samples: list[Sample],
    maps_dir: str | None = None,
    batch_size: int | None = None,
) -> dict:
    """Score every sample and compute image/pixel metrics.

    Returns a JSON-ready dict with ``image_auroc``, ``pixel_auroc``, ``pixel_aupro``,
    ``f1_max``, ``threshold`` (the bundle's calibrated threshold), ``n_images`` and
    ``seconds_per_image`` (model time: forward + search + maps, excluding image decoding),
    ``stage_seconds_per_image`` (decode, encoder and search per scale, maps, score),
    plus per-scale image AUROC, the confusion counts at the calibrated threshold, the
    bundle's ``calibration`` (promised false-alarm rate) and ``false_alarms`` (the rate
    observed on the test normals, checked against the promise).
    Pixel metrics are ``None`` when the test set has no ground-truth masks.
    """
    if not samples:
        raise ValueError("no test images")
    bs = batch_size or det.cfg.score.batch_size
    gather = EvalGather(samples, det.scales, det.cfg.model.image_size)
    with progress_bar(total=len(samples), desc="evaluating") as bar:
        for i in range(0, len(samples), bs):
            chunk = samples[i : i + bs]
            gather.add(
                np.arange(i, i + len(chunk)), score_chunk(det, chunk, gather.with_masks, maps_dir)
            )
            bar.update(len(chunk))
    report = gather.report(det.threshold, det.version, det.meta.get("calibration"))
    report["inference"] = det.inference_mode  # runtime / resolved precision / layout used
    return report


def metrics_report(
    labels: np.ndarray,
    scores: np.ndarray,
    scale_scores: dict[int, np.ndarray],
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    threshold: float | None,
    version: str | None,
    model_seconds: float,
    calibration: dict | None = None,
) -> dict:
    """The metrics JSON from gathered scores (shared by the in-process and Ray Data paths).

    ``calibration`` (the bundle's ``meta["calibration"]``) is reported as is, with the
    false-alarm rate observed on the test normals against what it promises."""
    scores = np.asarray(scores, dtype=np.float32)
    out = compute_metrics(labels, scores, masks, maps)
    out.update(
        threshold=threshold,
        n_images=len(labels),
        seconds_per_image=model_seconds / len(labels),
        scale_image_auroc={
            str(s): _none_if_nan(image_auroc(labels, v)) for s, v in scale_scores.items()
        },
        model_version=version,
    )
    if threshold is not None:
        pos = scores > threshold
        out["at_threshold"] = {
            "true_positives": int((pos & (labels == 1)).sum()),
            "false_positives": int((pos & (labels == 0)).sum()),
            "true_negatives": int((~pos & (labels == 0)).sum()),
            "false_negatives": int((~pos & (labels == 1)).sum()),
        }
        out["false_alarms"] = observed_fpr(pos[labels == 0], calibration)
    out["calibration"] = calibration
    return out


def observed_fpr(flags: np.ndarray, calibration: dict | None) -> dict | None:
    """Observed false-alarm rate of the test normals (``flags``: flagged or not) and, when
    the calibration says what it promised, the count its promise predicts for that many
    normal images (Beta-Binomial interval) and whether the observation falls inside."""
    m = int(flags.size)
    if m == 0:
        return None
    n_flag = int(flags.sum())
    out: dict = {"n_normal": m, "flagged": n_flag, "observed_fpr": n_flag / m}
    if calibration and calibration.get("rank") is not None:
        lo, hi = expected_flags(calibration, m)
        out.update(
            promised_fpr=calibration.get("promised_fpr"),
            promised_fpr_interval=calibration.get("fpr_interval"),
            expected_flagged=[lo, hi],
            within_promise=lo <= n_flag <= hi,
        )
    return out


def _none_if_nan(x: float | None) -> float | None:
    return None if x is None or x != x else float(x)


def _write_overlays(
    maps_dir: str,
    chunk: list[Sample],
    images: torch.Tensor,
    amaps: torch.Tensor,
    masks: list[torch.Tensor] | None,
    det: Detector,
) -> None:
    """One PNG per image: image | heatmap overlay | ground truth (when the set has masks)."""
    lo, hi = viz.color_range(amaps, det.threshold)
    for i, (s, img, amap) in enumerate(zip(chunk, images, amaps, strict=True)):
        p = PurePosixPath(s.path)
        name = f"{p.parent.name}_{p.stem}.png"
        mask = None if masks is None else masks[i].numpy()  # normal images: an empty panel
        panel = viz.overlay(viz.tensor_to_rgb(img), amap.numpy(), lo, hi, mask)
        storage.write_bytes(storage.join(maps_dir, name), viz.to_png(panel))
