"""``mspray evaluate --ray``: the core's evaluation
(:func:`mspray.evaluation.evaluate.score_chunk` on
actors, :class:`mspray.evaluation.evaluate.EvalGather` on the driver) over a Ray Data actor pool.

Like the core, a test image that cannot be read is an error (a labelled test set is curated
data, and a metric over a silently shrunk set would mislead).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from mspray.config import PoolConfig
from mspray.data.datasets import Sample
from mspray.evaluation.evaluate import EvalGather, has_masks, score_chunk
from mspray.ray.runtime import DetectorActor, init_ray, map_with_detector


class EvalScorer(DetectorActor):
    """Ray Data actor: a batch of samples -> :func:`score_chunk` arrays plus their ``idx``."""

    def __init__(self, with_masks: bool, maps_dir: str | None, **actor: Any) -> None:
        super().__init__(**actor)
        self.with_masks, self.maps_dir = with_masks, maps_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = [
            Sample(str(p), int(lab), str(m) if m else None, str(d))
            for p, lab, m, d in zip(
                batch["path"], batch["label"], batch["mask_path"], batch["defect"], strict=True
            )
        ]
        out = score_chunk(self.det, samples, self.with_masks, self.maps_dir)
        mode = json.dumps(self.det.inference_mode, sort_keys=True)  # as run on this actor
        return {
            "idx": np.asarray(batch["idx"], np.int64),
            "inference": np.array([mode] * len(samples)),
            **out,
        }


def evaluate_ray(
    bundle: str,
    samples: list[Sample],
    maps_dir: str | None = None,
    *,
    pool: PoolConfig | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Metrics of ``bundle`` (a version or a root) on ``samples``: the dict of
    :func:`mspray.evaluation.evaluate.evaluate`."""
    import ray

    from mspray.artifacts.bundle import load_config, read_meta, resolve_bundle

    if not samples:
        raise ValueError("no test images")
    bundle = resolve_bundle(bundle)  # every actor loads the same version
    cfg = load_config(bundle, overrides)
    meta = read_meta(bundle)
    init_ray()
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
    ds = map_with_detector(
        ray.data.from_items(rows),
        EvalScorer,
        bundle,
        cfg,
        pool or PoolConfig(),
        n_items=math.ceil(len(samples) / bs),
        batch_size=bs,
        batch_format="numpy",
        with_masks=has_masks(samples),
        maps_dir=maps_dir,
    )
    gather = EvalGather(samples, cfg.model.scales, cfg.model.image_size)
    modes: set[str] = set()
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        gather.add(b["idx"], b)
        modes.update(str(m) for m in b["inference"])
    report = gather.report(meta.get("threshold"), meta.get("version"), meta.get("calibration"))
    # how the encoders ran (one mode, unless actors on different hardware resolved differently)
    runs = [json.loads(m) for m in sorted(modes)]
    report["inference"] = runs[0] if len(runs) == 1 else runs
    return report
