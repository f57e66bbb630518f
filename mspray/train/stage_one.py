"""Self-supervised stage one: the VGG16 trunk learns to tell normal images from synthetic
anomalies before the per-scale encoders train (seed 002, after CutPaste).

Without ImageNet weights the trunk starts from random features. Here it first trains, on
the normal training images alone, to classify random crops as *normal* or as carrying one
of the ``train.stage_one_kinds`` anomalies (:mod:`mspray.data.anomalies`; CutPaste's
3-way task with the default cut-paste and scar kinds). Selection then pastes only the
other kinds (:func:`mspray.train.selection.selection_kinds`), so it never grades the trunk
on the task it trained for. The trained trunk is returned as ``features.*`` tensors, the
layout of ImageNet's VGG16 weights, so it initialises every scale the way those would.

Crops are ``2 × the largest patch`` (at most the image): the encoders only ever see patches
that size, and a crop costs a quarter of a whole image per halving. Sampling is seeded by
(seed, step, rank); nothing reads the clock, so the same seed, config, device kind and
thread count give the same trunk. Under DDP each rank draws its own crops from its shard
of the images and ``wrap`` makes the gradient average.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from mspray.config import MSPrayConfig
from mspray.config.run import progress_bar
from mspray.data.anomalies import paste_anomaly
from mspray.model.backbone import init_prefix, vgg16_prefix
from mspray.model.multiscale import normalize
from mspray.model.scales import scale_spec

log = logging.getLogger(__name__)

#: steps at the end whose loss and accuracy the summary reports (means)
TAIL = 20


class StageOneModel(nn.Module):
    """The trunk, global average pooling and a small classifier (normal + one class per
    anomaly kind)."""

    def __init__(self, n_layers: int, n_classes: int):
        super().__init__()
        self.features = vgg16_prefix(n_layers)
        width = [m for m in self.features if isinstance(m, nn.Conv2d)][-1].out_channels
        self.classifier = nn.Sequential(
            nn.Linear(width, 128), nn.LeakyReLU(0.1), nn.Linear(128, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def trunk_layers(cfg: MSPrayConfig) -> int:
    """VGG16 ``features`` modules every scale of ``cfg`` needs (the deepest prefix)."""
    return max(scale_spec(s).prefix_layers for s in cfg.model.scales)


def crop_size(cfg: MSPrayConfig) -> int:
    """Side of the training crops: twice the largest patch, at most the image."""
    return min(cfg.model.image_size, 2 * max(cfg.model.scales))


def _batch(
    images: torch.Tensor, kinds: tuple[str, ...], n: int, crop: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random crops, half of them with an anomaly (kinds in turn); labels 0 = normal,
    ``1 + i`` = ``kinds[i]``."""
    idx = torch.randint(images.shape[0], (n,), generator=g)
    h, w = images.shape[-2:]
    ys = torch.randint(h - crop + 1, (n,), generator=g).tolist()
    xs = torch.randint(w - crop + 1, (n,), generator=g).tolist()
    out, labels = [], []
    for j in range(n):
        x = images[idx[j], :, ys[j] : ys[j] + crop, xs[j] : xs[j] + crop].float()
        label = 0
        if j % 2:
            label = 1 + (j // 2) % len(kinds)
            x, _ = paste_anomaly(x, kinds[label - 1], g)
        out.append(x)
        labels.append(label)
    return torch.stack(out), torch.tensor(labels)


def train_stage_one(
    cfg: MSPrayConfig,
    images: torch.Tensor,
    trunk_state: dict[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    rank: int = 0,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the trunk on normal ``images`` (``N×3×H×W`` in [0, 1], this rank's share)
    against synthetic anomalies; ``trunk_state``: ``features.*`` tensors to start from
    (default: the seeded random init). Returns the trained ``features.*`` tensors (on CPU)
    and a summary for ``meta.json``. ``wrap`` (e.g. DDP) wraps the model for the steps."""
    t = cfg.train
    kinds = tuple(t.stage_one_kinds)
    n_layers, crop = trunk_layers(cfg), crop_size(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed + 1_234)  # the same init on every rank and run
        model = StageOneModel(n_layers, 1 + len(kinds))
    init_prefix(model.features, trunk_state)
    model = model.to(device)
    net = wrap(model) if wrap is not None else model
    opt = torch.optim.Adam(net.parameters(), lr=t.stage_one_lr)
    loss_fn = nn.CrossEntropyLoss()
    losses: list[float] = []
    correct: list[float] = []
    t0 = time.perf_counter()
    bar = progress_bar(range(t.stage_one_steps), desc="stage one", leave=False, disable=rank)
    net.train()
    for step in bar:
        g = torch.Generator().manual_seed((t.seed * 1_000_003 + step * 7_919 + rank * 31) % 2**63)
        x, y = _batch(images, kinds, t.stage_one_batch, crop, g)
        x, y = normalize(x).to(device), y.to(device)
        logits = net(x)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        correct.append(float((logits.argmax(1) == y).float().mean()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    tail = slice(-min(TAIL, len(losses)), None)
    summary = {
        "steps": t.stage_one_steps,
        "kinds": list(kinds),
        "crop": crop,
        "batch": t.stage_one_batch,
        "lr": t.stage_one_lr,
        "trunk_layers": n_layers,
        "from": "given trunk" if trunk_state is not None else "random init",
        "loss_first": losses[0] if losses else None,
        "loss_last": sum(losses[tail]) / max(1, len(losses[tail])),
        "accuracy_last": sum(correct[tail]) / max(1, len(correct[tail])),
        "chance": 0.5,  # half the crops are normal: always answering "normal"
        "seconds": time.perf_counter() - t0,
    }
    if rank == 0:
        log.info(
            "stage one: %d steps, loss %.3f -> %.3f, accuracy %.2f (chance %.2f)",
            summary["steps"],
            summary["loss_first"] or float("nan"),
            summary["loss_last"],
            summary["accuracy_last"],
            summary["chance"],
        )
    state = {
        f"features.{k}": v.detach().cpu().clone() for k, v in model.features.state_dict().items()
    }
    return state, summary
