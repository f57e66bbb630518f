"""The encoders of all scales as one module, and one scale's encoder + angle head.

Images in, per-scale embedding grids out, computed densely (one forward pass per scale for
the whole batch; never patch by patch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from mspray.config import MSPrayConfig
from mspray.model.backbone import IMAGENET_MEAN, IMAGENET_STD, init_prefix, random_stem_state
from mspray.model.encoder import AngleHead, PatchEncoder
from mspray.model.scales import STEM_LAYERS


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


def stem_scale(cfg: MSPrayConfig) -> int | None:
    """The scale whose training trains the shared stem (the smallest patch: its encoder is
    little more than the stem), or None when ``model.shared_stem`` is off."""
    return min(cfg.model.scales) if cfg.model.shared_stem else None


def training_order(cfg: MSPrayConfig) -> list[int]:
    """Scales in the order they must train: the stem's scale before those that reuse it."""
    first = stem_scale(cfg)
    return sorted(cfg.model.scales, key=lambda s: s != first)


def stem_state(model: ScaleModel) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of ``model``'s stem, to build the other scales from."""
    return {f"features.{k}": v.detach().cpu() for k, v in model.encoder.stem().state_dict().items()}


def build_scale_model(
    cfg: MSPrayConfig,
    scale: int,
    vgg_state: dict | None,
    stem: dict[str, torch.Tensor] | None = None,
) -> ScaleModel:
    """A fresh :class:`ScaleModel` for ``scale`` (ImageNet prefix when ``vgg_state``); the
    angle head exists only when ``train.losses`` has ``ssl``.

    With ``model.shared_stem`` every scale starts from the same stem (``stem``: the trained
    one of :func:`stem_scale`; else ImageNet's, or one random init seeded by ``train.seed``)
    and all but the stem's own scale keep it frozen, so inference computes it once."""
    torch.manual_seed(cfg.train.seed + scale)  # heads' random init is reproducible
    d = cfg.model.embed_dim
    m = cfg.model
    head = AngleHead(d, angle_input=m.angle_input) if "ssl" in cfg.train.losses else None
    encoder = PatchEncoder(scale, d, vgg_state, output_tanh=m.output_tanh)
    if m.shared_stem:
        if stem is None and vgg_state is None:
            stem = random_stem_state(STEM_LAYERS, cfg.train.seed)
        if stem is not None:
            init_prefix(encoder.stem(), stem)
        if scale != stem_scale(cfg):
            encoder.stem().requires_grad_(False)
    return ScaleModel(encoder, head)


class MultiScaleEncoder(nn.Module):
    """Enc64 / Enc32 / Enc16 (whichever the config lists) and their angle heads."""

    def __init__(self, cfg: MSPrayConfig, scale_models: dict[int, ScaleModel] | None = None):
        super().__init__()
        self.cfg = cfg
        models = scale_models or {s: build_scale_model(cfg, s, None) for s in cfg.model.scales}
        self.scales = nn.ModuleDict({str(s): models[s] for s in cfg.model.scales})
        self._stem_check: tuple[tuple, bool] | None = None

    def encoder(self, scale: int) -> PatchEncoder:
        return self.scales[str(scale)].encoder

    def shared_stem(self, scales: Iterable[int]) -> nn.Sequential | None:
        """The stem (conv1_1 .. pool2) that the encoders of ``scales`` hold bit for bit, so
        it can be computed once for all of them; None for fewer than two scales or stems
        that differ (bundles trained without ``model.shared_stem``).

        The comparison is redone only when a stem parameter changed (training, loading)."""
        stems = [self.encoder(s).stem() for s in scales]
        if len(stems) < 2:
            return None
        params = [p for st in stems for p in st.parameters()]
        key = tuple((p.data_ptr(), p._version) for p in params)
        if self._stem_check is None or self._stem_check[0] != key:
            ref = stems[0].state_dict()
            same = all(
                torch.equal(ref[k], v) for st in stems[1:] for k, v in st.state_dict().items()
            )
            self._stem_check = (key, same)
        return stems[0] if self._stem_check[1] else None

    def grid_steps(self, strides: dict[int, int]) -> dict[int, int]:
        """Per scale, how many network-stride steps its ``stride`` spans (ValueError unless
        it is a multiple of the encoder's network stride)."""
        steps = {}
        for scale, stride in strides.items():
            net = self.encoder(scale).stride
            if stride % net:
                raise ValueError(f"stride {stride} is not a multiple of {net} (scale {scale})")
            steps[scale] = stride // net
        return steps

    @torch.no_grad()
    def embed_scales(
        self,
        images: torch.Tensor,
        strides: dict[int, int],
        timer: Callable[[str], contextlib.AbstractContextManager] | None = None,
    ) -> dict[int, torch.Tensor]:
        """``B×3×H×W`` images in [0, 1] -> ``{scale: B×h×w×D}`` embedding grids at the
        given stride per scale. A stem shared by those scales runs once; ``timer(stage)``
        (optional) times ``stem`` and each ``encoder_<scale>``."""
        timer = timer or (lambda stage: contextlib.nullcontext())
        steps = self.grid_steps(strides)
        x = normalize(images)
        stem, start = self.shared_stem(strides), 0
        if stem is not None:
            size = min(self.encoder(s).patch_size for s in strides)
            if x.shape[-1] < size or x.shape[-2] < size:
                raise ValueError(f"input {tuple(x.shape[-2:])} smaller than patch {size}")
            with timer("stem"):
                x, start = stem(x), STEM_LAYERS
        grids = {}
        for scale, step in steps.items():
            with timer(f"encoder_{scale}"):
                grid = self.encoder(scale)(x, start, step=step)
                grids[scale] = grid.permute(0, 2, 3, 1).contiguous()
        return grids

    def embed(self, images: torch.Tensor, scale: int, stride: int | None = None) -> torch.Tensor:
        """``B×3×H×W`` images in [0, 1] -> ``B×h×w×D`` embedding grid at ``stride``
        (default: the config's inference stride for ``scale``)."""
        stride = stride or self.cfg.stride_for(scale)
        return self.embed_scales(images, {scale: stride})[scale]
