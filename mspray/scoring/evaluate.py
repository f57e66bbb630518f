"""``mspray evaluate`` over Ray Data: the same metrics JSON as :func:`mspray.evaluate.evaluate`,
with images loaded and scored on an actor pool.

Actors return per image the image and scale scores and, when the test set has masks, the
fused map (float16, as the core keeps it) and the mask; the driver computes the metrics.
Like the core, a test image that cannot be read is an error (a labelled test set is curated
data, and a metric over a silently shrunk set would mislead).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch

from mspray.data.datasets import Sample
from mspray.evaluate import metrics_report
from mspray.scoring.runtime import PoolOptions, bundle_config, init_ray, load_worker_detector

log = logging.getLogger(__name__)


class EvalScorer:
    """Ray Data actor: a batch of samples -> scores (+ maps and masks for pixel metrics)."""

    def __init__(
        self,
        bundle: str,
        config_json: str,
        with_masks: bool,
        maps_dir: str | None,
        cpus: float,
        gpus: float,
    ) -> None:
        self.det = load_worker_detector(bundle, config_json, cpus, gpus)
        self.with_masks, self.maps_dir = with_masks, maps_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mspray.data.images import load_image, load_mask
        from mspray.evaluate import _write_overlays  # the core's panel layout and names

        det = self.det
        size, max_pixels = det.cfg.model.image_size, det.cfg.score.max_image_pixels
        samples = [
            Sample(str(p), int(lab), str(m) if m else None, str(d))
            for p, lab, m, d in zip(
                batch["path"], batch["label"], batch["mask_path"], batch["defect"], strict=True
            )
        ]
        images = torch.stack([load_image(s.path, size, max_pixels) for s in samples])
        t0 = time.perf_counter()
        pred = det.predict(images)
        seconds = time.perf_counter() - t0
        masks = [load_mask(s.mask_path if s.label else None, size) for s in samples]
        if self.maps_dir:
            _write_overlays(self.maps_dir, samples, images, pred.maps, masks, det)
        out = {
            "idx": np.asarray(batch["idx"], np.int64),
            "score": pred.image_scores.numpy().astype(np.float32),
            # the batch's model time, spread over its images so the driver can just sum
            "seconds": np.full(len(samples), seconds / len(samples)),
        }
        for s in det.scales:
            out[f"score_{s}"] = pred.scale_scores[s].numpy().astype(np.float32)
        if self.with_masks:
            out["map"] = pred.maps.half().numpy()
            out["mask"] = torch.stack(masks).numpy()
        return out


def evaluate_ray(
    bundle: str,
    samples: list[Sample],
    maps_dir: str | None = None,
    *,
    pool: PoolOptions | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    address: str | None = None,
) -> dict:
    """Metrics of ``bundle`` on ``samples``: the dict of :func:`mspray.evaluate.evaluate`."""
    import ray

    if not samples:
        raise ValueError("no test images")
    pool = pool or PoolOptions()
    cfg = bundle_config(bundle, overrides)
    with_masks = any(s.mask_path for s in samples if s.label == 1)
    init_ray(address, progress)
    rows = [
        {
            "idx": i,
            "path": s.path,
            "label": s.label,
            "mask_path": s.mask_path or "",
            "defect": s.defect,
        }
        for i, s in enumerate(samples)
    ]
    bs = cfg.score.batch_size
    ds = ray.data.from_items(rows).map_batches(
        EvalScorer,
        batch_size=bs,
        batch_format="numpy",
        fn_constructor_kwargs={
            "bundle": bundle,
            "config_json": cfg.to_json(),
            "with_masks": with_masks,
            "maps_dir": maps_dir,
            "cpus": pool.cpus_per_worker,
            "gpus": pool.gpus_per_worker,
        },
        **pool.map_batches_args(math.ceil(len(samples) / bs)),
    )
    n, size = len(samples), cfg.model.image_size
    scores = np.zeros(n, np.float32)
    scale_scores = {s: np.zeros(n, np.float32) for s in cfg.model.scales}
    maps = np.zeros((n, size, size), np.float16) if with_masks else None
    masks = np.zeros((n, size, size), np.uint8) if with_masks else None
    seen = np.zeros(n, bool)
    model_seconds = 0.0
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        idx = b["idx"]
        seen[idx] = True
        scores[idx] = b["score"]
        for s in scale_scores:
            scale_scores[s][idx] = b[f"score_{s}"]
        if with_masks:
            maps[idx] = b["map"]
            masks[idx] = b["mask"]
        model_seconds += float(b["seconds"].sum())
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} test images got no score")
    return _metrics(bundle, samples, scores, scale_scores, masks, maps, model_seconds)


def _metrics(
    bundle: str,
    samples: list[Sample],
    scores: np.ndarray,
    scale_scores: dict[int, np.ndarray],
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    model_seconds: float,
) -> dict:
    """The metrics JSON of :func:`mspray.evaluate.evaluate`, from arrays gathered from the
    actors (threshold and version from the bundle's meta.json)."""
    import json

    from mspray import storage

    meta = json.loads(storage.read_text(storage.join(bundle, "meta.json")))
    return metrics_report(
        np.array([s.label for s in samples]),
        scores,
        scale_scores,
        masks,
        maps.astype(np.float32) if maps is not None else None,
        threshold=meta.get("threshold"),
        version=meta.get("version"),
        model_seconds=model_seconds,
        calibration=meta.get("calibration"),
    )
