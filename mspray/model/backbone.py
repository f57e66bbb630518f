"""VGG16 convolutional prefix with unpadded convolutions, and ImageNet weight loading.

The layer layout (and therefore the ``state_dict`` keys ``features.N.weight``) is exactly
torchvision's ``vgg16().features``, so torchvision's published weight file loads as is; mspray
builds the layers itself so that torchvision is optional. Convolutions use ``padding=0``:
with no zero padding, the embedding of a patch depends only on the pixels inside it, which is
what makes dense (whole-image) extraction equal to cropping each patch alone.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import torch
from torch import nn

from mspray import storage

log = logging.getLogger(__name__)

#: torchvision's ``VGG16_Weights.IMAGENET1K_V1`` file.
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = "vgg16-397923af.pth"
#: torchvision's VGG16 "D" configuration: conv widths, "M" = 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for but could not be found or read."""


def vgg16_prefix(n_layers: int) -> nn.Sequential:
    """The first ``n_layers`` modules of torchvision's ``vgg16().features``, unpadded.

    Random init is torchvision's for VGG (He normal, fan-out, zero bias): torch's default
    conv init shrinks activations layer after layer, so a randomly initialised 7-conv prefix
    gave embeddings ~100× smaller than the head's scale and trained poorly from scratch.
    """
    layers: list[nn.Module] = []
    in_ch = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(in_ch, int(v), kernel_size=3, padding=0)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            in_ch = int(v)
        if len(layers) >= n_layers:
            break
    return nn.Sequential(*layers[:n_layers])


def load_vgg16_state(weights_path: str | None = None, download: bool = True) -> dict:
    """ImageNet VGG16 ``features.*`` tensors, from ``weights_path`` (a local file or a
    storage URI such as ``s3://``), else the torch hub cache, else a download into that cache.

    Loading never unpickles code (``weights_only=True``).
    """
    if weights_path:
        if not storage.is_file(weights_path):
            raise PretrainedWeightsError(f"VGG16 weights file not found: {weights_path}")
        # a local file is read by torch directly (no second copy of ~0.5 GB in memory)
        source = (
            storage.normalize(weights_path)
            if storage.is_local(weights_path)
            else io.BytesIO(storage.read_bytes(weights_path))
        )
        state = torch.load(source, map_location="cpu", weights_only=True)
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
        if cached.is_file():
            state = torch.load(cached, map_location="cpu", weights_only=True)
        elif download and not os.environ.get("MSPRAY_OFFLINE"):
            try:
                state = torch.hub.load_state_dict_from_url(
                    VGG16_URL, map_location="cpu", progress=False, weights_only=True
                )
            except Exception as e:  # network errors come in many types
                raise PretrainedWeightsError(
                    f"could not download VGG16 ImageNet weights ({e}); put {VGG16_FILE} in "
                    f"{cached.parent} or pass a weights path"
                ) from e
        else:
            raise PretrainedWeightsError(f"VGG16 weights not in the torch hub cache ({cached})")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    feats = {k: v for k, v in state.items() if k.startswith("features.")}
    if not feats:
        raise PretrainedWeightsError("weights file has no 'features.*' tensors (not VGG16?)")
    return feats


def init_prefix(prefix: nn.Sequential, state: dict | None) -> None:
    """Copy ImageNet weights into ``prefix`` (strictly, for the layers it has)."""
    if state is None:
        return
    own = {f"features.{k}": v for k, v in prefix.state_dict().items()}
    missing = [k for k in own if k not in state]
    if missing:
        raise PretrainedWeightsError(f"weights file lacks {missing[:3]}")
    prefix.load_state_dict({k[len("features.") :]: state[k] for k in own}, strict=True)


def random_stem_state(n_layers: int, seed: int) -> dict:
    """``features.*`` tensors of a seeded random init of the first ``n_layers`` modules:
    the same for every scale built with ``seed`` (so a shared stem can be computed once)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stem = vgg16_prefix(n_layers)
    return {f"features.{k}": v for k, v in stem.state_dict().items()}
