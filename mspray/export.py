"""Export a bundle for consumers without Ray or torch: ONNX encoders, faiss banks, one JSON.

``export_bundle`` writes into one directory::

    encoder_<scale>.onnx   the scale's patch encoder (input: ImageNet-normalised B×3×H×W
                           float32, any batch and image size >= the patch; output: the dense
                           B×D×h×w embedding grid at the network stride)
    bank_<scale>.faiss     the bank, faiss's own format (``faiss.read_index``)
    mspray_export.json     everything else a scorer needs (see :func:`export_spec`)

:mod:`mspray.export_runtime` scores images from these files with numpy, ONNX Runtime and faiss
only. The same ONNX conversion backs ``score.runtime="onnx"`` (:class:`OnnxEncoders`), which
runs the encoders on ONNX Runtime inside a :class:`~mspray.detector.Detector`.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

EXPORT_FORMAT = 1
SPEC_FILE = "mspray_export.json"
OPSET = 17


def encoder_file(scale: int) -> str:
    return f"encoder_{scale}.onnx"


def bank_file(scale: int) -> str:
    return f"bank_{scale}.faiss"


def encoder_to_onnx(encoder: nn.Module, patch_size: int) -> bytes:
    """ONNX bytes of one patch encoder, fp32, with dynamic batch and image size.

    A contiguous fp32 copy is exported, so a channels_last or autocast-wrapped model
    exports the same graph.
    """
    enc = copy.deepcopy(encoder).float().eval().to(memory_format=torch.contiguous_format)
    side = max(2 * patch_size, 32)
    example = torch.zeros(1, 3, side, side)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # the tracer warns about the Python size check in forward(); it only guards input
        warnings.simplefilter("ignore")
        torch.onnx.export(
            enc,
            (example,),
            buf,
            dynamo=False,
            input_names=["images"],
            output_names=["grid"],
            dynamic_axes={
                "images": {0: "batch", 2: "height", 3: "width"},
                "grid": {0: "batch", 2: "grid_h", 3: "grid_w"},
            },
            opset_version=OPSET,
        )
    return buf.getvalue()


def onnx_session(model: bytes | str, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for ``model`` (bytes or a path), with all graph
    optimisations (they include the blocked NCHWc convolution layout) and ``threads``
    intra-op threads (default: torch's thread count, so Ray's CPU limits carry over)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(
            "ONNX Runtime is not installed: pip install 'mspray[export]' (or onnx onnxruntime)"
        ) from e
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


class OnnxEncoders:
    """The encoders of a :class:`~mspray.model.multiscale.MultiScaleEncoder` on ONNX Runtime.

    ``self[scale](x)`` maps ImageNet-normalised ``B×3×H×W`` float32 numpy to the ``B×D×h×w``
    grid, like the torch encoder's ``forward``.
    """

    def __init__(self, model: nn.Module, scales: tuple[int, ...], threads: int | None = None):
        self.sessions = {
            s: onnx_session(encoder_to_onnx(model.encoder(s), s), threads) for s in scales
        }

    def __getitem__(self, scale: int):
        sess = self.sessions[scale]

        def run(x: np.ndarray) -> np.ndarray:
            return sess.run(None, {"images": np.ascontiguousarray(x, dtype=np.float32)})[0]

        return run


def export_spec(det: Any) -> dict:
    """The JSON a consumer needs besides the ONNX and faiss files."""
    from mspray.model.backbone import IMAGENET_MEAN, IMAGENET_STD

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
    from mspray.detector import Detector

    if isinstance(bundle, Detector):
        det = bundle
    else:
        from mspray.bundle import load_bundle

        det = load_bundle(str(bundle), device="cpu")
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
    """``python -m mspray.export --bundle B --out DIR``."""
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
