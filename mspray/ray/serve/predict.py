"""The work behind ``POST /v1/predict``: decode and resize one image, score a batch of
them with one forward pass and one bank search per scale, and draw the anomaly map."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mspray.ray.serve import request as inputs
from mspray.ray.serve.loading import ServingModel


@dataclass
class ItemResult:
    image_score: float
    is_anomalous: bool | None
    threshold: float | None
    model_version: str
    batch_size: int
    scale_scores: dict[str, float]
    amap: np.ndarray  # H×W fused anomaly map


def decode_resized(data: bytes, name: str, current: ServingModel, size: int) -> torch.Tensor:
    """Decode (checking the pixel limit) and resize to the model's input: 3×size×size."""
    from mspray.data.images import to_tensor

    return to_tensor(inputs.decode(data, name, current.max_image_pixels), size)


def score_batch(det: Any, images: list[torch.Tensor]) -> list[ItemResult]:
    """One forward pass and one bank search per scale for the whole batch."""
    size = det.cfg.model.image_size
    # An image resized for the previous model can meet a new model of another size
    # right after a swap: bring it to this model's size.
    batch = torch.stack(
        [
            t
            if t.shape[-1] == size and t.shape[-2] == size
            else F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True)[0]
            for t in images
        ]
    )
    pred = det.predict(batch)
    out = []
    for i in range(len(images)):
        flag = None if pred.is_anomalous is None else bool(pred.is_anomalous[i])
        out.append(
            ItemResult(
                image_score=float(pred.image_scores[i]),
                is_anomalous=flag,
                threshold=det.threshold,
                model_version=det.version,
                batch_size=len(images),
                scale_scores={str(s): float(v[i]) for s, v in pred.scale_scores.items()},
                amap=pred.maps[i].numpy(),
            )
        )
    return out


def map_png_base64(amap: np.ndarray, threshold: float | None) -> tuple[str, list[float]]:
    """The anomaly map as a base64 PNG heatmap (threshold mid-ramp) and its colour range."""
    from mspray.viz import color_range, colorize, to_png

    lo, hi = color_range(amap, threshold)
    return base64.b64encode(to_png(colorize(amap, lo, hi))).decode("ascii"), [lo, hi]
