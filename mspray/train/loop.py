"""Per-scale training loop in plain torch (the Ray Train adapter runs this same loop).

One step embeds every patch the four losses need in a single forward pass, then computes
L = λ(L_SVDD + L_Cos) + L_SSL + L_Kmeans. Sampling is seeded by (seed, rank, epoch), so a
resumed run draws the same patches it would have drawn, and nothing depends on wall-clock
time: one seed and config give bit-identical weights (a budget, if any, is ``max_steps``).

Model selection (:meth:`ScaleTrainer.validate`). The training loss cannot rank epochs: its
K-means term is measured against centers refit only every few epochs, and the SVDD and
K-means terms are distances that shrink when the embeddings collapse (all patches mapped
close together), the failure mode selection must avoid. The kept model is therefore the one
with the lowest *validation score* on held-out normal images (never test labels), a
scale-free version of eq. 5 on a fixed draw:
λ·(SVDD / spread + L_Cos) + L_SSL + Kmeans / spread, where ``spread`` is the RMS distance of
the validation embeddings to their mean and the K-means centers are refit on the current
validation embeddings (same seed each epoch). Rescaling the embeddings leaves it unchanged,
and a collapse raises it (SSL can no longer tell angles apart). Without held-out images the
last epoch is kept.
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
from mspray.train.kmeans import Comm, LocalComm, fit_centers, reduce_sum

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
        self.steps = 0  # optimiser steps completed (equal on every rank)
        self.best_val = math.inf  # lowest validation score so far
        self.best_epoch = 0
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
        total = reduce_sum(self.comm, torch.tensor([float(n_local_images)]))
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
        # Monitoring only (no gradient): angle accuracy and the embeddings' RMS distance to
        # their mean, which falls towards 0 when the encoder collapses.
        with torch.no_grad():
            e = emb.detach().float()
            out["spread"] = (e - e.mean(0)).pow(2).sum(1).mean().sqrt()
            if logits is not None:
                out["ssl_acc"] = (logits.argmax(1) == s["ssl"].labels.to(emb.device)).float().mean()
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
        """One optimiser step on this rank's ``batch`` (gradients averaged by DDP if wrapped).

        Returns the loss and its terms, plus ``spread`` and ``ssl_acc`` (monitoring)."""
        terms = self._losses(images, batch, self.model)
        loss = losses.total_loss(terms, self.t.lam)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return loss, terms

    # ------------------------------------------------------------------ epochs
    def train_epoch(
        self, images: torch.Tensor, epoch: int, progress: bool = True
    ) -> dict[str, float]:
        """One epoch over ``images`` (normalised, on device). Returns mean loss terms.

        With ``train.max_steps`` the epoch ends once that many optimiser steps have been
        taken in the whole run (``out["stopped_at_max_steps"]`` is then 1); the step count
        is the same on every rank, so all ranks stop together.
        """
        self.model.train()
        local_batch = max(1, self.t.batch_size // self.comm.world_size)
        steps = self._steps(images.shape[0], local_batch)
        g = self._generator(epoch, 1)
        h, w = images.shape[-2:]
        # The whole epoch's draw is made even when max_steps cuts it short, so the samples of
        # every step do not depend on the budget.
        s = self._draw(images.shape[0], steps * local_batch, h, w, g)
        left = self.t.max_steps - self.steps if self.t.max_steps else steps
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        bar = tqdm(
            range(min(steps, max(0, left))),
            desc=f"scale {self.scale} epoch {epoch + 1}",
            leave=False,
            disable=not progress or self.comm.rank != 0,
        )
        done = 0
        for step in bar:
            idx = torch.arange(step * local_batch, (step + 1) * local_batch)
            loss, terms = self.train_step(images, {k: v.take(idx) for k, v in s.items()})
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            done = step + 1
            bar.set_postfix(loss=f"{sums['loss'] / done:.4f}")
        bar.close()
        dt = time.perf_counter() - t0
        out = {k: v / max(1, done) for k, v in sums.items()}
        out["steps"] = float(self.steps)
        out["stopped_at_max_steps"] = float(done < steps)
        # A "sample" is one draw for every loss (a triplet, an angle pair and a K-means patch).
        out["samples_per_s"] = done * local_batch * self.comm.world_size / max(dt, 1e-9)
        patches = sum(len(v.pos) for v in s.values())
        out["patches_per_s"] = out["samples_per_s"] * patches
        return out

    @torch.no_grad()
    def validate(self, images: torch.Tensor) -> dict[str, float]:
        """Validation terms and the model-selection score on held-out normal images.

        A fixed draw (same patches every epoch). Returns ``val_<term>`` for each loss,
        ``val_ssl_acc``, ``val_spread`` and ``val_score`` (see the module docstring).
        Collective: every rank must call it, with or without local images.
        """
        self.core.eval()
        enc = self.core.encoder
        d = enc.embed_dim
        n_local = images.shape[0]
        n = n_local * self.t.samples_per_image
        s: dict[str, sampling.Samples] = {}
        if n_local:
            g = torch.Generator().manual_seed(self.t.seed + 12_345 + self.comm.rank)
            s = self._draw(n_local, n, *images.shape[-2:], g)
        bs = max(1, self.t.batch_size)

        def embed(name: str) -> list[torch.Tensor]:
            """Embeddings ``n×D`` of each patch position of sample kind ``name``."""
            if name not in s:
                return []
            out = []
            for pos in s[name].pos:
                chunks = [
                    enc.embed_patches(
                        sampling.crop(images, s[name].img[i : i + bs], pos[i : i + bs], self.scale)
                    ).float()
                    for i in range(0, n, bs)
                ]
                out.append(torch.cat(chunks) if chunks else images.new_zeros((0, d)))
            return out

        want = set(self.t.losses)
        near, ssl, km = embed("near"), embed("ssl"), embed("kmeans")
        everything = torch.cat([*near, *ssl, *km]) if n else images.new_zeros((0, d)).float()
        # Local sums, all-reduced in one collective: count, svdd, cos, ssl CE, ssl correct,
        # number of embeddings, sum of squared norms, then the D-vector sum of embeddings.
        v = torch.zeros(7 + d, dtype=torch.float64, device=images.device)
        v[0] = n
        if near and "svdd" in want:
            v[1] = losses.svdd_loss(near[0], near[1]).double() * n
        if near and "cos" in want:
            v[2] = losses.cos_loss(near[0], near[1], near[2]).double() * n
        if ssl:
            logits = self.core.head(ssl[0], ssl[1])
            labels = s["ssl"].labels.to(logits.device)
            v[3] = losses.ssl_loss(logits, labels).double() * n
            v[4] = (logits.argmax(1) == labels).sum()
        v[5] = everything.shape[0]
        v[6] = everything.double().pow(2).sum()
        v[7:] = everything.double().sum(0)
        tot = reduce_sum(self.comm, v)
        count, n_emb = float(tot[0]), float(tot[5])
        if count == 0:
            return {"val_score": math.nan}
        mean = tot[7:] / n_emb
        spread = math.sqrt(max(float(tot[6] / n_emb - mean.pow(2).sum()), 0.0)) + 1e-12
        out = {"val_spread": spread}
        if "svdd" in want:
            out["val_svdd"] = float(tot[1]) / count
        if "cos" in want:
            out["val_cos"] = float(tot[2]) / count
        if "ssl" in want:
            out["val_ssl"] = float(tot[3]) / count
            out["val_ssl_acc"] = float(tot[4]) / count
        if "kmeans" in want:
            # Centers of the current validation embeddings (fixed seed): the term measures
            # how clustered they are now, not how far they drifted from stale centers.
            x = km[0] if km else images.new_zeros((0, d)).float()
            centers = fit_centers(
                x, self.t.n_centers, self.t.kmeans_iters, self.comm, seed=self.t.seed + 99
            )
            part = torch.tensor(
                [float(losses.kmeans_loss(x, centers).double() * x.shape[0]) if len(x) else 0.0],
                dtype=torch.float64,
            )
            out["val_kmeans"] = float(reduce_sum(self.comm, part)[0]) / count
        score = self.t.lam * (out.get("val_svdd", 0.0) / spread + out.get("val_cos", 0.0))
        score += out.get("val_ssl", 0.0) + out.get("val_kmeans", 0.0) / spread
        out["val_score"] = score
        return out

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

        ``on_epoch_end`` is called after every epoch (checkpointing, reporting). The model
        keeps the *last* weights, which pair with the optimizer state for resuming; the
        selected ones are ``self.best_state`` (see :meth:`best_model_state`).
        """
        train = normalize(train_images.to(self.device))
        val = normalize(val_images.to(self.device)) if val_images is not None else None
        use_val = val is not None and self._global_count(val.shape[0]) > 0
        if not use_val and self.comm.rank == 0:
            log.warning("scale %d: no held-out images; keeping the last epoch's model", self.scale)
        epochs = range(self.epoch, self.t.epochs)
        bar = tqdm(
            epochs,
            desc=f"train scale {self.scale}",
            disable=not progress or self.comm.rank != 0,
            initial=self.epoch,
            total=self.t.epochs,
        )
        for epoch in bar:
            if self.t.max_steps and self.steps >= self.t.max_steps:
                break
            t0 = time.perf_counter()
            if "kmeans" in self.t.losses and (
                self.centers is None or epoch % self.t.center_update_every == 0
            ):
                self.update_centers(train, epoch)
            metrics = self.train_epoch(train, epoch, progress=progress)
            if use_val:
                metrics.update(self.validate(val))
            metrics["epoch"] = epoch + 1
            metrics["seconds"] = time.perf_counter() - t0
            self.epoch = epoch + 1
            score = metrics.get("val_score", math.nan)
            if not use_val or score < self.best_val:
                self.best_val = score if use_val else math.inf
                self.best_epoch = self.epoch
                self.best_state = _cpu_copy(self.core.state_dict())
            metrics["best_val_score"] = self.best_val
            metrics["best_epoch"] = self.best_epoch
            self.history.append(metrics)
            if self.comm.rank == 0:
                log.info("scale %d epoch %d: %s", self.scale, self.epoch, _summary(metrics))
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", val=f"{score:.4f}")
            if on_epoch_end is not None:
                on_epoch_end(self, metrics)
            if metrics["stopped_at_max_steps"]:
                if self.comm.rank == 0:
                    log.info(
                        "scale %d: train.max_steps=%d reached in epoch %d",
                        self.scale,
                        self.t.max_steps,
                        epoch + 1,
                    )
                break
        return self.history

    def best_model_state(self) -> dict[str, torch.Tensor]:
        """Weights of the selected epoch (the current ones if no epoch has run)."""
        return self.best_state if self.best_state is not None else _cpu_copy(self.core.state_dict())

    def _global_count(self, n: int) -> int:
        return int(reduce_sum(self.comm, torch.tensor([float(n)])).item())

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": _cpu_copy(self.core.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "centers": None if self.centers is None else self.centers.cpu(),
            "epoch": self.epoch,
            "steps": self.steps,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.centers = None if state["centers"] is None else state["centers"].to(self.device)
        self.epoch = int(state["epoch"])
        self.steps = int(state.get("steps", 0))
        self.best_val = float(state["best_val"])
        self.best_epoch = int(state.get("best_epoch", 0))
        self.best_state = state["best_state"]
        self.history = list(state["history"])


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in copy.copy(state).items()}


def run_summary(history: list[dict[str, float]], cfg: MSPrayConfig) -> dict[str, Any]:
    """Where a scale's training stopped and why, and its per-epoch history, for
    ``meta.json`` (non-finite numbers become None so the file is strict JSON)."""

    def clean(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    last = history[-1] if history else {}
    stopped = bool(last.get("stopped_at_max_steps"))
    return {
        "epochs": int(last.get("epoch", 0)),
        "steps": int(last.get("steps", 0)),
        "stopped_by": "max_steps" if stopped else "epochs",
        "max_steps": cfg.train.max_steps,
        "selected_epoch": int(last.get("best_epoch", 0)),
        "history": [{k: clean(v) for k, v in h.items()} for h in history],
    }


def _summary(m: dict[str, float]) -> str:
    keys = ("loss", "svdd", "cos", "ssl", "ssl_acc", "kmeans", "spread", "val_score")
    keys += ("val_ssl_acc", "val_spread", "steps")
    return " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


def build_scale_model(cfg: MSPrayConfig, scale: int, vgg_state: dict | None) -> ScaleModel:
    """A fresh :class:`ScaleModel` for ``scale`` (ImageNet prefix when ``vgg_state``); the
    angle head exists only when ``train.losses`` has ``ssl``."""
    torch.manual_seed(cfg.train.seed + scale)  # heads' random init is reproducible
    d = cfg.model.embed_dim
    head = AngleHead(d) if "ssl" in cfg.train.losses else None
    return ScaleModel(PatchEncoder(scale, d, vgg_state), head)


def train_scale(
    cfg: MSPrayConfig,
    scale: int,
    train_images: torch.Tensor,
    val_images: torch.Tensor | None,
    vgg_state: dict | None = None,
    progress: bool = True,
) -> tuple[ScaleModel, list[dict[str, float]]]:
    """Train one scale on one process; returns the selected model (lowest validation score)
    and the per-epoch history."""
    device = resolve_device(cfg.train.device)
    model = build_scale_model(cfg, scale, vgg_state).to(device)
    trainer = ScaleTrainer(cfg, scale, model, device)
    history = trainer.fit(train_images, val_images, progress=progress)
    best = build_scale_model(cfg, scale, None)
    best.load_state_dict(trainer.best_model_state())
    best.train_summary = run_summary(history, cfg)  # read by fit_detector for meta.json
    return best, history
