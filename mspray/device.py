"""Which torch device a piece of work runs on: the one home of the ``auto`` rule.

Every ``device`` setting (``train.device``, ``score.device``, Serve's ``device``, the
``--device`` flags) has the one type :data:`mspray.config.Device` and is decided here:
``auto`` means CUDA when a GPU is there for the work, else the CPU (:func:`pick_device`).
What "there" means is the caller's input: a GPU this process can see (local work, the
default), the GPU a Ray actor or Serve replica reserved, or the GPU node types of a cluster
that has none up yet (the Ray layer asks with the cluster's capabilities). Asking for CUDA
where none is visible (a "GPU" node whose driver is missing) falls back to the CPU with one
log line instead of failing deep inside torch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
_warned: set[str] = set()


def pick_device(setting: str, gpu: bool) -> str:
    """The ``auto`` rule: ``auto`` is ``"cuda"`` when ``gpu`` (a GPU is there for this work),
    else ``"cpu"``; any other setting (``cpu``, ``cuda[:N]``, ``mps``) is kept."""
    if setting == "auto":
        return "cuda" if gpu else "cpu"
    return setting


def wants_gpu(setting: str, gpu: bool) -> bool:
    """Whether ``setting`` runs on a CUDA GPU where ``gpu`` says whether one is there
    (what a Ray actor reserves: a GPU or none)."""
    return pick_device(setting, gpu).startswith("cuda")


def resolve_device(setting: str | torch.device, gpu: bool | None = None) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda[:N]`` / ``mps`` -> a usable :class:`torch.device`;
    ``gpu`` (default: this process sees a CUDA device) decides ``auto``."""
    import torch

    name = str(setting)
    if name == "auto":
        name = pick_device(name, torch.cuda.is_available() if gpu is None else gpu)
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        if name not in _warned:  # one line per process, not one per batch
            _warned.add(name)
            log.warning("device %r requested but CUDA is not available here: using the CPU", name)
        return torch.device("cpu")
    return dev
