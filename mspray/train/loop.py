"""Per-scale training loop in plain torch (the Ray Train adapter runs this same loop).

One step embeds every patch the four losses need in a single forward pass, then computes
L = λ(L_SVDD + L_Cos) + L_SSL + L_Kmeans. Sampling is seeded by (seed, rank, epoch), so a
resumed run draws the same patches it would have drawn. The kept model is the one with the
lowest loss on held-out *normal* images (never test labels).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mspray.config import MSPrayConfig
from mspray.device import resolve_device
from mspray.model.encoder import AngleHead, PatchEncoder
from mspray.model.multiscale import ScaleModel, normalize
from mspray.train import losses, sampling
from mspray.train.kmeans import Comm, LocalComm, fit_centers

log = logging.getLogger(__name__)


class ScaleTrainer:
    """Trains one scale's :class:`ScaleModel`.

    ``model`` may be wrapped (DDP); ``comm`` provides the collectives for K-means centers,
    step counts and validation loss. With the defaults it is single-process training.
    """

    def __init__(
        self,
        cfg: MSPrayConfig,
        scale: int,
        model: nn.Module,
        device: torch.device | str = "cpu",
        comm: Comm | None = None,
    ):
        self.cfg = cfg
        self.t = cfg.train
        self.scale = scale
        self.model = model
        self.device = torch.device(device)
        self.comm = comm or LocalComm()
        self.core: ScaleModel = getattr(model, "module", model)
        # Every parameter, the angle head's last layer included, is optimised.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.t.lr)
        self.centers: torch.Tensor | None = None
        self.epoch = 0  # epochs completed
        self.best_val = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ sampling
    def _generator(self, epoch: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(
            (
                self.t.seed * 1_000_003
                + self.scale * 7919
                + epoch * 104_729
                + self.comm.rank * 31
                + salt
            )
            % (2**63)
        )

    def _draw(
        self, n_images: int, n: int, h: int, w: int, g: torch.Generator
    ) -> dict[str, sampling.Samples]:
        """Positions for one epoch, keyed by sample kind. As in the paper (sec. 3.3), SVDD
        and Cos share one selection: the pair (i, j) of each triplet is the SVDD pair, so
        those two losses cost three patches per sample, not five."""
        p, want = self.scale, set(self.t.losses)
        kinds = {}
        if "cos" in want:
            kinds["near"] = sampling.sample_triplets
        elif "svdd" in want:
            kinds["near"] = sampling.sample_svdd
        if "ssl" in want:
            kinds["ssl"] = sampling.sample_angles
        if "kmeans" in want:
            kinds["kmeans"] = sampling.sample_patches
        return {
            name: fn(sampling.balanced_images(n_images, n, g), h, w, p, g)
            for name, fn in kinds.items()
        }

    def _steps(self, n_local_images: int, local_batch: int) -> int:
        """Steps per epoch, equal on every worker: global samples / global batch."""
        total = self.comm.all_reduce_sum(torch.tensor([float(n_local_images)]))
        return max(
            1,
            math.ceil(
                float(total.item())
                * self.t.samples_per_image
                / (local_batch * self.comm.world_size)
            ),
        )

    # ------------------------------------------------------------------ one step
    def _losses(
        self, images: torch.Tensor, s: dict[str, sampling.Samples], model: nn.Module
    ) -> dict[str, torch.Tensor]:
        p = self.scale
        chunks, spans, start = [], {}, 0
        for name, smp in s.items():
            k = len(smp.pos)
            for pos in smp.pos:
                chunks.append(sampling.crop(images, smp.img, pos, p))
            spans[name] = (start, len(smp), k)
            start += len(smp) * k
        patches = torch.cat(chunks)
        ssl_a = ssl_b = None
        if "ssl" in spans:
            o, n, _ = spans["ssl"]
            ssl_a = torch.arange(o, o + n, device=patches.device)
            ssl_b = ssl_a + n
        emb, logits = model(patches, ssl_a, ssl_b)

        def part(name: str, i: int) -> torch.Tensor:
            o, n, _ = spans[name]
            return emb[o + i * n : o + (i + 1) * n]

        out: dict[str, torch.Tensor] = {}
        if "svdd" in self.t.losses:
            out["svdd"] = losses.svdd_loss(part("near", 0), part("near", 1))
        if "cos" in self.t.losses:
            out["cos"] = losses.cos_loss(part("near", 0), part("near", 1), part("near", 2))
        if "ssl" in spans:
            out["ssl"] = losses.ssl_loss(logits, s["ssl"].labels.to(emb.device))
        if "kmeans" in spans:
            assert self.centers is not None, "update_centers() must run before training"
            out["kmeans"] = losses.kmeans_loss(part("kmeans", 0), self.centers)
        return out

    def train_step(
        self, images: torch.Tensor, batch: dict[str, sampling.Samples]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimiser step on this rank's ``batch`` (gradients averaged by DDP if wrapped)."""
        terms = self._losses(images, batch, self.model)
        loss = losses.total_loss(terms, self.t.lam)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss, terms

    # ------------------------------------------------------------------ epochs
    def train_epoch(
        self,
        images: torch.Tensor,
        epoch: int,
        progress: bool = True,
        deadline: float | None = None,
    ) -> dict[str, float]:
        """One epoch over ``images`` (normalised, on device). Returns mean loss terms.

        With a ``deadline`` (``time.monotonic()`` value) the epoch ends early once it has
        passed; ``out["stopped_early"]`` is then 1. Every rank stops after the same step.
        """
        self.model.train()
        local_batch = max(1, self.t.batch_size // self.comm.world_size)
        steps = self._steps(images.shape[0], local_batch)
        g = self._generator(epoch, 1)
        h, w = images.shape[-2:]
        s = self._draw(images.shape[0], steps * local_batch, h, w, g)
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        bar = tqdm(
            range(steps),
            desc=f"scale {self.scale} epoch {epoch + 1}",
            leave=False,
            disable=not progress or self.comm.rank != 0,
        )
        done, stopped = 0, False
        for step in bar:
            idx = torch.arange(step * local_batch, (step + 1) * local_batch)
            loss, terms = self.train_step(images, {k: v.take(idx) for k, v in s.items()})
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            done = step + 1
            bar.set_postfix(loss=f"{sums['loss'] / done:.4f}")
            if deadline is not None and self._any_rank(time.monotonic() > deadline):
                stopped = True
                break
        bar.close()
        dt = time.perf_counter() - t0
        out = {k: v / done for k, v in sums.items()}
        out["stopped_early"] = float(stopped)
        steps = done
        # A "sample" is one draw for every loss (a triplet, an angle pair and a K-means patch).
        out["samples_per_s"] = steps * local_batch * self.comm.world_size / dt
        patches = sum(len(v.pos) for v in s.values())
        out["patches_per_s"] = out["samples_per_s"] * patches
        return out

    @torch.no_grad()
    def validation_loss(self, images: torch.Tensor) -> float:
        """Loss on held-out normal images with a fixed draw (comparable across epochs)."""
        self.core.eval()
        n_local = images.shape[0]
        total = torch.zeros(2)
        if n_local:
            g = torch.Generator().manual_seed(self.t.seed + 12_345 + self.comm.rank)
            n = n_local * self.t.samples_per_image
            s = self._draw(n_local, n, *images.shape[-2:], g)
            bs = max(1, self.t.batch_size)
            for i in range(0, n, bs):
                idx = torch.arange(i, min(n, i + bs))
                terms = self._losses(images, {k: v.take(idx) for k, v in s.items()}, self.core)
                total += torch.tensor(
                    [float(losses.total_loss(terms, self.t.lam)) * len(idx), len(idx)]
                )
        total = self.comm.all_reduce_sum(total)
        return float(total[0] / total[1]) if total[1] > 0 else math.nan

    @torch.no_grad()
    def update_centers(self, images: torch.Tensor, epoch: int) -> None:
        """Recompute K-means centers from embeddings of all workers' images."""
        self.core.eval()
        g = self._generator(epoch, 2)
        h, w = images.shape[-2:]
        n = images.shape[0] * self.t.samples_per_image
        s = sampling.sample_patches(
            sampling.balanced_images(images.shape[0], n, g), h, w, self.scale, g
        )
        embs = []
        for i in range(0, n, 512):
            idx = torch.arange(i, min(n, i + 512))
            patches = sampling.crop(images, s.img[idx], s.pos[0][idx], self.scale)
            embs.append(self.core.encoder.embed_patches(patches).float())
        x = torch.cat(embs) if embs else torch.zeros(0, self.core.encoder.embed_dim)
        self.centers = fit_centers(
            x, self.t.n_centers, self.t.kmeans_iters, self.comm, seed=self.t.seed + epoch
        )

    def fit(
        self,
        train_images: torch.Tensor,
        val_images: torch.Tensor | None = None,
        on_epoch_end: Callable[[ScaleTrainer, dict[str, float]], None] | None = None,
        progress: bool = True,
    ) -> list[dict[str, float]]:
        """Train from ``self.epoch`` to ``cfg.train.epochs``; images in [0, 1] (``B×3×H×W``).

        ``on_epoch_end`` is called after every epoch (checkpointing, reporting). At the end
        the model holds the weights with the lowest validation loss.
        """
        train = normalize(train_images.to(self.device))
        val = normalize(val_images.to(self.device)) if val_images is not None else None
        use_val = val is not None and self._global_count(val.shape[0]) > 0
        if not use_val and self.comm.rank == 0:
            log.warning(
                "scale %d: no held-out images; selecting the model by training loss", self.scale
            )
        epochs = range(self.epoch, self.t.epochs)
        bar = tqdm(
            epochs,
            desc=f"train scale {self.scale}",
            disable=not progress or self.comm.rank != 0,
            initial=self.epoch,
            total=self.t.epochs,
        )
        budget = self.t.max_minutes
        deadline = time.monotonic() + 60 * budget if budget > 0 else None
        for epoch in bar:
            t0 = time.perf_counter()
            if "kmeans" in self.t.losses and (
                self.centers is None or epoch % self.t.center_update_every == 0
            ):
                self.update_centers(train, epoch)
            metrics = self.train_epoch(train, epoch, progress=progress, deadline=deadline)
            metrics["val_loss"] = self.validation_loss(val) if use_val else metrics["loss"]
            metrics["epoch"] = epoch + 1
            metrics["seconds"] = time.perf_counter() - t0
            self.epoch = epoch + 1
            if metrics["val_loss"] < self.best_val:
                self.best_val = metrics["val_loss"]
                self.best_state = _cpu_copy(self.core.state_dict())
            metrics["best_val_loss"] = self.best_val
            self.history.append(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", val=f"{metrics['val_loss']:.4f}")
            if on_epoch_end is not None:
                on_epoch_end(self, metrics)
            if metrics["stopped_early"]:
                if self.comm.rank == 0:
                    log.warning(
                        "scale %d: time budget of %g min reached in epoch %d; keeping the "
                        "best model so far (train.max_minutes, 0 = no limit)",
                        self.scale,
                        budget,
                        epoch + 1,
                    )
                break
        if self.best_state is not None:
            self.core.load_state_dict(self.best_state)
        return self.history

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (ranks must agree on when to stop)."""
        return bool(self.comm.all_reduce_sum(torch.tensor([float(flag)])).item() > 0)

    def _global_count(self, n: int) -> int:
        return int(self.comm.all_reduce_sum(torch.tensor([float(n)])).item())

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": _cpu_copy(self.core.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "centers": None if self.centers is None else self.centers.cpu(),
            "epoch": self.epoch,
            "best_val": self.best_val,
            "best_state": self.best_state,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.centers = None if state["centers"] is None else state["centers"].to(self.device)
        self.epoch = int(state["epoch"])
        self.best_val = float(state["best_val"])
        self.best_state = state["best_state"]
        self.history = list(state["history"])


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in copy.copy(state).items()}


def build_scale_model(cfg: MSPrayConfig, scale: int, vgg_state: dict | None) -> ScaleModel:
    """A fresh :class:`ScaleModel` for ``scale`` (ImageNet prefix when ``vgg_state``)."""
    torch.manual_seed(cfg.train.seed + scale)  # heads' random init is reproducible
    return ScaleModel(
        PatchEncoder(scale, cfg.model.embed_dim, vgg_state), AngleHead(cfg.model.embed_dim)
    )


def train_scale(
    cfg: MSPrayConfig,
    scale: int,
    train_images: torch.Tensor,
    val_images: torch.Tensor | None,
    vgg_state: dict | None = None,
    progress: bool = True,
) -> tuple[ScaleModel, list[dict[str, float]]]:
    """Train one scale on one process; returns the best model (by validation loss)."""
    device = resolve_device(cfg.train.device)
    model = build_scale_model(cfg, scale, vgg_state).to(device)
    trainer = ScaleTrainer(cfg, scale, model, device)
    history = trainer.fit(train_images, val_images, progress=progress)
    return trainer.core.cpu(), history
