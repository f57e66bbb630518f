"""The encoders of all scales as one module, and one scale's encoder + angle head.

Images in, per-scale embedding grids out, computed densely (one forward pass per scale for
the whole batch; never patch by patch).
"""

from __future__ import annotations

import torch
from torch import nn

from mspray.config import MSPrayConfig
from mspray.model.backbone import IMAGENET_MEAN, IMAGENET_STD
from mspray.model.encoder import AngleHead, PatchEncoder


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of ``B×3×H×W`` images in [0, 1]."""
    mean = images.new_tensor(IMAGENET_MEAN)[None, :, None, None]
    std = images.new_tensor(IMAGENET_STD)[None, :, None, None]
    return (images - mean) / std


class ScaleModel(nn.Module):
    """Encoder and angle classifier of one scale as one module (one DDP wrapper).

    ``head`` is None when the SSL loss is not used: DDP requires every parameter to get a
    gradient in every step, so an unused head must not exist.
    """

    def __init__(self, encoder: PatchEncoder, head: AngleHead | None):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(
        self,
        patches: torch.Tensor,
        ssl_a: torch.Tensor | None = None,
        ssl_b: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings ``N×D`` of ``patches`` and angle logits for index pairs (a, b)."""
        emb = self.encoder.embed_patches(patches)
        logits = None
        if ssl_a is not None:
            if self.head is None:
                raise ValueError("this model has no angle head (built without the ssl loss)")
            logits = self.head(emb[ssl_a], emb[ssl_b])
        return emb, logits


class MultiScaleEncoder(nn.Module):
    """Enc64 / Enc32 / Enc16 (whichever the config lists) and their angle heads."""

    def __init__(self, cfg: MSPrayConfig, scale_models: dict[int, ScaleModel] | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.model.embed_dim
        # The angle head exists only when the ssl loss trained it (as in build_scale_model).
        ssl = "ssl" in cfg.train.losses
        m = cfg.model
        models = scale_models or {
            s: ScaleModel(
                PatchEncoder(s, d, output_tanh=m.output_tanh),
                AngleHead(d, angle_input=m.angle_input) if ssl else None,
            )
            for s in cfg.model.scales
        }
        self.scales = nn.ModuleDict({str(s): models[s] for s in cfg.model.scales})

    def encoder(self, scale: int) -> PatchEncoder:
        return self.scales[str(scale)].encoder

    @torch.no_grad()
    def embed(self, images: torch.Tensor, scale: int, stride: int | None = None) -> torch.Tensor:
        """``B×3×H×W`` images in [0, 1] -> ``B×h×w×D`` embedding grid at ``stride``
        (default: the config's inference stride for ``scale``)."""
        enc = self.encoder(scale)
        stride = stride or self.cfg.stride_for(scale)
        if stride % enc.stride:
            raise ValueError(f"stride {stride} is not a multiple of {enc.stride} (scale {scale})")
        step = stride // enc.stride
        grid = enc(normalize(images))[:, :, ::step, ::step]
        return grid.permute(0, 2, 3, 1).contiguous()
