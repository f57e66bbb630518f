"""Per-scale patch encoders (Enc64, Enc32, Enc16) and the relative-angle classifier.

Each encoder is a VGG16 prefix (unpadded) plus a small convolutional head whose output is
1x1 for a θ×θ input. Applied to a whole image it is fully convolutional and yields the grid
of all patch embeddings at the network stride, equal to embedding each patch cropped alone.

The per-scale trunk and head are rows of :data:`mspray.model.scales.SCALES` (the table of
how each scale was chosen is there).

Every feature row/column of the prefix is used by the head, so every pixel of the patch
reaches its embedding and none outside it does (tested). For θ = 64 the prefix stops before
pool3: on conv3_3's 7×7 map a 2×2 pool keeps only 3 rows and drops the 7th (input pixels
60-63); the head's 7×7 kernel instead reads all 7, and its stride 2 keeps the network stride
at 8 (conv3_3 is at stride 4). No weights are lost: pool3 has none, so the ImageNet
``features.*`` keys are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mspray.model.backbone import vgg16_prefix
from mspray.model.scales import STEM_LAYERS, ScaleSpec, scale_spec

N_ANGLES = 12


def network_stride(patch_size: int) -> int:
    """Pixel stride between neighbouring embeddings of a dense grid for ``patch_size``."""
    return scale_spec(patch_size).network_stride


def _head(spec: ScaleSpec, dim: int) -> nn.Sequential:
    h = spec.head
    return nn.Sequential(
        nn.Conv2d(spec.channels, h.hidden, h.kernel1, stride=h.stride1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(h.hidden, dim, h.kernel2),
    )


class PatchEncoder(nn.Module):
    """Enc_θ: maps θ×θ patches to D-vectors; whole images to a D×h×w embedding grid.

    Inputs are ImageNet-normalised float tensors ``B×3×H×W``.
    """

    def __init__(
        self,
        patch_size: int,
        embed_dim: int = 64,
        vgg_state: dict | None = None,
        output_tanh: bool = False,
    ):
        super().__init__()
        spec = scale_spec(patch_size)
        self.output_tanh = output_tanh
        self.patch_size = patch_size
        self.stride = spec.network_stride
        self.embed_dim = embed_dim
        self.features = vgg16_prefix(spec.prefix_layers)
        if vgg_state is not None:
            from mspray.model.backbone import init_prefix

            init_prefix(self.features, vgg_state)
        self.head = _head(spec, embed_dim)

    def forward(self, x: torch.Tensor, start: int = 0, step: int = 1) -> torch.Tensor:
        """``B×3×H×W`` -> ``B×D×h×w`` with ``h = (H - θ) // stride + 1``.

        With ``start > 0``, ``x`` is the output of the trunk's first ``start`` modules
        (a stem computed once for several scales) and only the rest runs. With ``step > 1``
        only every ``step``-th embedding per axis is returned (``[..., ::step, ::step]`` of
        the full grid); a head whose second convolution is 1×1 then computes only those."""
        if start == 0 and (x.shape[-1] < self.patch_size or x.shape[-2] < self.patch_size):
            raise ValueError(f"input {tuple(x.shape[-2:])} smaller than patch {self.patch_size}")
        h = self.features[start:](x)
        first, rest = self.head[0], self.head[1:]
        if step > 1 and rest[-1].kernel_size == (1, 1):
            # the first head convolution at step × its stride: the skipped outputs are never
            # computed (for Enc64 at the paper's stride 16, three quarters of its head)
            out = rest(F.conv2d(h, first.weight, first.bias, stride=first.stride[0] * step))
        else:
            out = self.head(h)
            if step > 1:  # (no slice at step 1: the ONNX tracer would make its bounds inputs)
                out = out[:, :, ::step, ::step]
        return torch.tanh(out) if self.output_tanh else out

    def stem(self) -> nn.Sequential:
        """The trunk's first :data:`STEM_LAYERS` modules (conv1_1 .. pool2), not copied."""
        return self.features[:STEM_LAYERS]

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """``N×3×θ×θ`` patches -> ``N×D`` embeddings."""
        return self.forward(patches).flatten(1)


class AngleHead(nn.Module):
    """Classifier C: predicts the relative angle (12 classes of 30°) of patch j about i.

    Every layer, the last included, is a trainable parameter (the public code's last layer
    never received gradients).
    """

    def __init__(
        self,
        embed_dim: int = 64,
        hidden: int = 128,
        n_classes: int = N_ANGLES,
        angle_input: str = "concat",
    ):
        super().__init__()
        if angle_input not in ("concat", "diff"):
            raise ValueError(f"angle_input must be concat or diff, got {angle_input!r}")
        # "diff" (the authors' code) reads h1 - h2: only the difference of the two patches,
        # not where each one is, can reach the classifier.
        self.angle_input = angle_input
        self.net = nn.Sequential(
            nn.Linear((2 if angle_input == "concat" else 1) * embed_dim, hidden),
            nn.LeakyReLU(0.1),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.1),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.cat([a, b], dim=1) if self.angle_input == "concat" else a - b
        return self.net(x)
