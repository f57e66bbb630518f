"""Which torch device a piece of work runs on.

One home for the rule, so training, batch scoring and Serve agree: ``auto`` means CUDA when
this process can see a GPU, else CPU. Asking for CUDA where none is visible (a "GPU" node
whose driver is missing, a replica that reserved no GPU) falls back to CPU with one log line
instead of failing deep inside torch.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
_warned: set[str] = set()


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda[:N]`` / ``mps`` -> a usable :class:`torch.device`."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        if name not in _warned:  # one line per process, not one per batch
            _warned.add(name)
            log.warning("device %r requested but CUDA is not available here: using the CPU", name)
        return torch.device("cpu")
    return dev
