"""Export a bundle for consumers without Ray or torch: ONNX encoders, faiss banks, one JSON.

``export_bundle`` writes into one directory::

    encoder_<scale>.onnx   the scale's patch encoder (input: ImageNet-normalised B×3×H×W
                           float32, any batch and image size >= the patch; output: the dense
                           B×D×h×w embedding grid at the network stride)
    bank_<scale>.faiss     the bank, faiss's own format (``faiss.read_index``)
    mspray_export.json     everything else a scorer needs (see :func:`export_spec`)

:mod:`mspray.onnx.runtime` scores images from these files with numpy, ONNX Runtime and faiss
only; :mod:`mspray.onnx.convert` holds the ONNX conversion itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mspray.artifacts.bundle import load_bundle
from mspray.detector import Detector
from mspray.model.backbone import IMAGENET_MEAN, IMAGENET_STD
from mspray.onnx.convert import encoder_to_onnx
from mspray.onnx.runtime import SPEC_FILE

EXPORT_FORMAT = 1


def encoder_file(scale: int) -> str:
    return f"encoder_{scale}.onnx"


def bank_file(scale: int) -> str:
    return f"bank_{scale}.faiss"


def export_spec(det: Any) -> dict:
    """The JSON a consumer needs besides the ONNX and faiss files."""
    cfg = det.cfg
    m = cfg.model
    fusion_stats = det.stats if m.fusion == "zscore" and det.stats else None
    return {
        "format": EXPORT_FORMAT,
        "version": det.version,
        "image_size": m.image_size,
        "scales": list(m.scales),
        "strides": [cfg.stride_for(s) for s in m.scales],
        "network_strides": [det.model.encoder(s).stride for s in m.scales],
        "embed_dim": m.embed_dim,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "resize": "bilinear, antialiased, to image_size×image_size RGB in [0, 1]",
        "fusion": m.fusion,
        "fusion_stats": (
            {str(s): list(fusion_stats[s]) for s in m.scales} if fusion_stats else None
        ),
        "smoothing_sigma": m.smoothing_sigma,
        "score_window": m.score_window,
        "score_window_stride": m.score_window_stride,
        "threshold": det.threshold,
        "encoders": {str(s): encoder_file(s) for s in m.scales},
        "banks": {str(s): bank_file(s) for s in m.scales},
    }


def export_bundle(bundle: str | Any, out: str, fmt: str = "onnx") -> dict:
    """Export ``bundle`` (a bundle URI or a loaded Detector) to the directory ``out``.

    Returns the spec written to ``mspray_export.json``.
    """
    if fmt != "onnx":
        raise ValueError(f"unsupported export format {fmt!r}; only 'onnx' is available")
    det = bundle if isinstance(bundle, Detector) else load_bundle(str(bundle), device="cpu")
    missing = [s for s in det.scales if s not in det.banks]
    if missing:
        raise ValueError(f"bundle has no bank for scale(s) {missing}; nothing to score with")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    spec = export_spec(det)
    for s in det.scales:
        (root / encoder_file(s)).write_bytes(encoder_to_onnx(det.model.encoder(s), s))
        (root / bank_file(s)).write_bytes(det.banks[s].to_bytes())
    # written last: its presence marks a complete export
    (root / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    return spec


def main(argv: list[str] | None = None) -> int:
    """``python -m mspray.onnx.export --bundle B --out DIR``."""
    import argparse

    ap = argparse.ArgumentParser(description="export a bundle as ONNX encoders + faiss banks")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", default="onnx", choices=["onnx"])
    args = ap.parse_args(argv)
    spec = export_bundle(args.bundle, args.out, args.format)
    print(json.dumps({"out": args.out, "scales": spec["scales"], "version": spec["version"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
