"""A served model: the detector loaded from its bundle version, the limits it serves under,
and the small prediction a health check runs through it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mspray.config import ServeConfig


@dataclass(frozen=True)
class ServingModel:
    """A loaded detector with the settings it serves under; swapped as one reference."""

    name: str
    uri: str  # as configured: a bundle root or a version
    version_uri: str  # the version it serves (a root's version pinned for this deploy)
    detector: Any  # mspray.detector.Detector
    settings: ServeConfig
    max_image_bytes: int
    max_image_pixels: int
    loaded_at: float

    @property
    def key(self) -> tuple:
        """The :class:`DetectorCache` key of this model's detector."""
        return (self.name, *self.settings.model_key(self.version_uri))

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/model`` shows: version, scales, banks, threshold, settings."""
        import torch

        det = self.detector
        return {
            "model": self.name,
            "model_version": det.version,
            "bundle_uri": self.uri,
            "version_uri": self.version_uri,
            "scales": list(det.scales),
            "strides": list(det.cfg.model.strides),
            "image_size": det.cfg.model.image_size,
            "bank_sizes": {str(s): b.ntotal for s, b in det.banks.items()},
            "threshold": det.threshold,
            # promised false-alarm rate (+ production check after `mspray calibrate`)
            "calibration": det.meta.get("calibration"),
            "device": str(det.device),
            "torch_threads": torch.get_num_threads(),
            "config": det.cfg.to_dict(),
            "serving": self.settings.model_dump(),
            "limits": {
                "max_image_bytes": self.max_image_bytes,
                "max_image_pixels": self.max_image_pixels,
            },
            "loaded_at": self.loaded_at,
        }


def load_detector(uri: str, device: str, bank_gpu: bool) -> Any:
    """Load the bundle at ``uri`` on ``device`` (a :class:`ServeConfig` device setting) and
    run one warm-up batch (lazy init off the request path)."""
    import ray
    import torch

    from mspray.artifacts.bundle import load_bundle, load_config, resolve_bundle
    from mspray.device import resolve_device

    uri = resolve_bundle(uri)  # a root: its latest version now; both reads use that one
    # The bundle's own runtime settings, with the faiss search moved to the GPU if asked.
    config = load_config(uri, {"bank.use_gpu": True}) if bank_gpu else None
    # auto: CUDA only when this replica reserved a GPU (num_gpus); one without a
    # reservation stays on the CPU even on a GPU node, where another actor owns the GPU
    det = load_bundle(
        uri, device=resolve_device(device, gpu=bool(ray.get_gpu_ids())), config=config
    )
    size = det.cfg.model.image_size
    det.predict(torch.zeros(1, 3, size, size))
    return det


def serving_model(
    name: str, uri: str, version_uri: str, settings: ServeConfig, det: Any
) -> ServingModel:
    """``det`` serving ``name`` from ``uri`` (version ``version_uri``) with the limits
    ``settings`` give it."""
    score_cfg = det.cfg.score
    return ServingModel(
        name=name,
        uri=uri,
        version_uri=version_uri,
        detector=det,
        settings=settings,
        max_image_bytes=settings.max_image_bytes or score_cfg.max_image_bytes,
        max_image_pixels=settings.max_image_pixels or score_cfg.max_image_pixels,
        loaded_at=time.time(),
    )


def probe(det: Any) -> None:
    """One small prediction through ``det`` (what the health check runs): a lasting device
    failure, e.g. a dead CUDA context, raises here as it would for every request."""
    import torch

    size = det.cfg.model.image_size
    det.predict(torch.full((1, 3, size, size), 0.5))
