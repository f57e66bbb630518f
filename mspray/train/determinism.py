"""What makes two training runs give bit-identical weights.

Same seed, config, device kind and torch thread count: identical weights (sampling is
seeded by (seed, scale, epoch, rank); nothing reads the clock). A different thread count or
device kind sums in another order and rounds differently, so weights then differ in the
last bits and drift apart over steps.
"""

from __future__ import annotations

import os

import torch


def deterministic_cuda() -> None:
    """Deterministic CUDA kernels for training: the Lloyd sums (``index_add_``), the
    backward of ``emb[ssl_a]`` (an accumulating index put) and cuDNN's convolutions have
    nondeterministic defaults. Process-wide (a Ray Train worker is a process of its own);
    an op without a deterministic kernel warns instead of failing."""
    # cuBLAS needs a fixed workspace for reproducible matmuls (read when cuBLAS starts)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
