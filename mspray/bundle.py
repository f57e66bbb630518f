"""Model bundle: one directory (local or ``s3://``) that holds everything needed to score.

Layout::

    config.json          MSPrayConfig
    model.safetensors    encoder + angle-head weights of every scale
    bank_<scale>.faiss   serialised faiss index of the scale's normal patch embeddings
    meta.json            threshold, the false-alarm rate it promises (``calibration``),
                         per-scale normalisation stats, ImageNet normalisation,
                         version, provenance; written last, so its presence marks a
                         complete bundle

Loading reads JSON, safetensors and faiss buffers only: no pickled code is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import time

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mspray import storage
from mspray.bank import PatchBank
from mspray.config import MSPrayConfig
from mspray.detector import Detector
from mspray.model.backbone import IMAGENET_MEAN, IMAGENET_STD
from mspray.model.detector import MultiScaleDetector

FORMAT = 1


class BundleError(RuntimeError):
    """A bundle is missing, incomplete or inconsistent."""


def bank_name(scale: int) -> str:
    return f"bank_{scale}.faiss"


def save_bundle(det: Detector, uri: str) -> str:
    """Write ``det`` to ``uri``; returns the bundle version (a content hash of the weights,
    banks, threshold and stats)."""
    weights = st_save({k: v.detach().cpu().contiguous() for k, v in det.model.state_dict().items()})
    banks = {s: det.banks[s].to_bytes() for s in det.scales if s in det.banks}
    digest = hashlib.sha256(weights)
    for s in sorted(banks):
        digest.update(banks[s])
    # the decision is part of the model: a recalibrated bundle gets a new version
    decision = {"threshold": det.threshold, "stats": {str(s): v for s, v in det.stats.items()}}
    digest.update(json.dumps(decision, sort_keys=True).encode())
    version = digest.hexdigest()[:12]
    storage.makedirs(uri)
    storage.write_text(storage.join(uri, "config.json"), det.cfg.to_json())
    storage.write_bytes(storage.join(uri, "model.safetensors"), weights)
    for s, data in banks.items():
        storage.write_bytes(storage.join(uri, bank_name(s)), data)
    meta = dict(det.meta)
    meta.update(
        format=FORMAT,
        version=version,
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        threshold=det.threshold,
        scale_stats={str(s): list(v) for s, v in det.stats.items()},
        bank_sizes={str(s): det.banks[s].ntotal for s in banks},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    storage.write_text(storage.join(uri, "meta.json"), json.dumps(meta, indent=2))
    det.meta = meta
    return version


def load_bundle(
    uri: str,
    device: str | torch.device = "cpu",
    with_banks: bool = True,
    config: MSPrayConfig | None = None,
) -> Detector:
    """Load a bundle saved by :func:`save_bundle`.

    ``config`` overrides runtime-only settings (e.g. ``bank.use_gpu``) while the model
    shape comes from the bundle's own config.
    """
    meta_uri = storage.join(uri, "meta.json")
    if not storage.exists(meta_uri):
        raise BundleError(f"{uri}: not a complete mspray bundle (no meta.json)")
    cfg = MSPrayConfig.from_json(storage.read_text(storage.join(uri, "config.json")))
    if config is not None:
        cfg = MSPrayConfig.from_dict(
            {**cfg.to_dict(), "bank": config.to_dict()["bank"], "score": config.to_dict()["score"]}
        )
    meta = json.loads(storage.read_text(meta_uri))
    if meta.get("format") != FORMAT:
        raise BundleError(f"{uri}: unsupported bundle format {meta.get('format')!r}")
    model = MultiScaleDetector(cfg)
    state = st_load(storage.read_bytes(storage.join(uri, "model.safetensors")))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{uri}: weights do not match config.json: {e}") from e
    banks = {}
    if with_banks:
        for s in cfg.model.scales:
            path = storage.join(uri, bank_name(s))
            if not storage.exists(path):
                raise BundleError(f"{uri}: missing {bank_name(s)}")
            banks[s] = PatchBank.from_bytes(storage.read_bytes(path), cfg.bank)
    stats = {int(s): (float(v[0]), float(v[1])) for s, v in meta.get("scale_stats", {}).items()}
    return Detector(cfg, model, banks, stats, meta.get("threshold"), meta, device=device)
