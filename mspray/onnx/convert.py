"""Torch encoders as ONNX: the conversion, ONNX Runtime sessions, and :class:`OnnxEncoders`,
which backs ``score.runtime="onnx"`` inside a :class:`~mspray.detector.Detector`.

Imports nothing from the bundle layer, so the detector can use it at scoring time.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

OPSET = 17


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
