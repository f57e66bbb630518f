"""Per-scale training loop in plain torch (the Ray Train adapter runs this same loop).

One step embeds every patch the four losses need in a single forward pass, then computes
L = λ(L_SVDD + L_Cos) + L_SSL + L_Kmeans. Sampling is seeded by (seed, rank, epoch), so a
resumed run draws the same patches it would have drawn, and nothing depends on wall-clock
time: the same seed, config, device kind and torch thread count give bit-identical weights
(a budget, if any, is ``max_steps``; on CUDA the kernels are made deterministic, see
:func:`deterministic_cuda`). Another thread count or device kind rounds differently.

Model selection (``train.selection``). ``synthetic`` (the default): the candidate epochs
(epoch 0, the encoders as they start; every ``train.select_every``-th; the last) are ranked
by how well they detect synthetic anomalies pasted into held-out normal images, image and
pixel AUROC (:mod:`mspray.train.selection`), so training never hands back encoders that
detect them worse than the untrained ones. ``loss``: the lowest validation score, eq. 5
made scale-free on a fixed draw (:meth:`ScaleTrainer.validate`; blind while SSL is at
chance; never epoch 0). ``last``: the last epoch, also kept without held-out images.
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

from mspray.config import MSPrayConfig
from mspray.config.run import progress_bar
from mspray.device import resolve_device
from mspray.model.multiscale import ScaleModel, build_scale_model, normalize
from mspray.train import losses, sampling
from mspray.train.determinism import deterministic_cuda
from mspray.train.kmeans import Comm, LocalComm, fit_centers, reduce_sum
from mspray.train.selection import SelectionSet, detection_metrics, scale_maps
from mspray.train.summary import log_line, run_summary
from mspray.train.validation import loss_validation

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
        self.t = sampling.without_leaky_ssl(cfg, scale)  # no SSL term where its pairs leak
        self.scale = scale
        self.model = model
        self.device = torch.device(device)
        self.comm = comm or LocalComm()
        self.core: ScaleModel = getattr(model, "module", model)
        if self.device.type == "cuda":
            deterministic_cuda()
        # Every trainable parameter, the angle head's last layer included, is optimised
        # (a shared stem is frozen).
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=self.t.lr)
        self.centers: torch.Tensor | None = None
        self.epoch = 0  # epochs completed
        self.steps = 0  # optimiser steps completed (equal on every rank)
        self.best_val = math.inf  # lowest selection criterion so far (lower is better)
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []
        #: selection table: one row per candidate epoch (epoch 0 included) with its
        #: synthetic-anomaly image / pixel AUROC and score
        self.candidates: list[dict[str, float]] = []
        #: where selection's normals came from, its window and anomaly kinds (meta.json)
        self.selection_info: dict[str, Any] | None = None
        self._aug: torch.Generator | None = None  # SSL augmentation draws of this epoch

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

    def draw(
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
                crop = sampling.crop(images, smp.img, pos, p)
                if name == "ssl" and self.t.ssl_augment and self._aug is not None:
                    crop = sampling.jitter_colour(crop, self._aug)
                chunks.append(crop)
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
            out["spread"] = losses.spread(emb.detach())
            if logits is not None:
                out["ssl_acc"] = (logits.argmax(1) == s["ssl"].labels.to(emb.device)).float().mean()
        if "svdd" in self.t.losses:
            out["svdd"] = losses.svdd_loss(part("near", 0), part("near", 1))
        if "cos" in self.t.losses:
            out["cos"] = losses.cos_loss(part("near", 0), part("near", 1), part("near", 2))
        if "ssl" in spans:
            out["ssl"] = losses.ssl_loss(logits, s["ssl"].labels.to(emb.device))
        if "kmeans" in spans and self.centers is not None:  # None during the warm-up
            out["kmeans"] = losses.kmeans_loss(
                part("kmeans", 0), self.centers, self.t.kmeans_relative
            )
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
    def train_epoch(self, images: torch.Tensor, epoch: int) -> dict[str, float]:
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
        s = self.draw(images.shape[0], steps * local_batch, h, w, g)
        self._aug = self._generator(epoch, 3)
        left = self.t.max_steps - self.steps if self.t.max_steps else steps
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        bar = progress_bar(
            range(min(steps, max(0, left))),
            desc=f"scale {self.scale} epoch {epoch + 1}",
            leave=False,
            disable=self.comm.rank != 0,
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

    def validate(self, images: torch.Tensor) -> dict[str, float]:
        """Validation loss terms and ``val_score`` on held-out normal images (see
        :func:`mspray.train.validation.loss_validation`). Collective."""
        return loss_validation(self, images)

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
        select_images: torch.Tensor | None = None,
    ) -> list[dict[str, float]]:
        """Train from ``self.epoch`` to ``cfg.train.epochs``; images in [0, 1] (``B×3×H×W``).

        ``on_epoch_end`` is called after every epoch (checkpointing, reporting). The model
        keeps the *last* weights, which pair with the optimizer state for resuming; the
        selected ones are ``self.best_state`` (see :meth:`best_model_state`).
        ``select_images``: held-out normal images for synthetic-anomaly selection on this
        rank (default ``val_images``; under DDP give them to rank 0 only, the others wait).
        """
        train = normalize(train_images.to(self.device))
        val = normalize(val_images.to(self.device)) if val_images is not None else None
        use_val = val is not None and self._global_count(val.shape[0]) > 0
        mode = self.t.selection if use_val else "last"
        if not use_val and self.comm.rank == 0:
            log.warning("scale %d: no held-out images; keeping the last epoch's model", self.scale)
        sel = None
        if mode == "synthetic":
            imgs = val_images if select_images is None else select_images
            if (
                imgs is not None
                and imgs.shape[0]
                and (self.comm.world_size == 1 or self.comm.rank == 0)
            ):
                sel = SelectionSet.build(self.cfg, train_images, imgs)
                self.selection_info = sel.info
            if self.epoch == 0 and not self.candidates and self.t.epochs > 0:
                # epoch 0: the untrained encoder
                self._consider(self._detect(sel), mode)
        epochs = range(self.epoch, self.t.epochs)
        bar = progress_bar(
            epochs,
            desc=f"train scale {self.scale}",
            disable=self.comm.rank != 0,
            initial=self.epoch,
            total=self.t.epochs,
        )
        for epoch in bar:
            if self.t.max_steps and self.steps >= self.t.max_steps:
                break
            t0 = time.perf_counter()
            if (
                "kmeans" in self.t.losses
                and epoch >= self.t.kmeans_warmup
                and (
                    self.centers is None
                    or (epoch - self.t.kmeans_warmup) % self.t.center_update_every == 0
                )
            ):
                self.update_centers(train, epoch)
            metrics = self.train_epoch(train, epoch)
            if use_val:
                metrics.update(self.validate(val))
            candidate = mode != "synthetic" or self._candidate(epoch + 1)
            if mode == "synthetic" and candidate:
                t1 = time.perf_counter()
                metrics.update({f"sel_{k}": v for k, v in self._detect(sel).items()})
                metrics["selection_seconds"] = time.perf_counter() - t1
            metrics["epoch"] = epoch + 1
            metrics["seconds"] = time.perf_counter() - t0
            self.epoch = epoch + 1
            if candidate:
                self._consider(metrics, mode)
            metrics["best_val_score"] = self.best_val
            metrics["best_epoch"] = self.best_epoch
            self.history.append(metrics)
            if self.comm.rank == 0:
                log.info("scale %d epoch %d: %s", self.scale, self.epoch, log_line(metrics))
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", best=self.best_epoch)
            if on_epoch_end is not None:
                on_epoch_end(self, metrics)
            if metrics["stopped_at_max_steps"]:
                if self.comm.rank == 0:
                    log.info("scale %d: max_steps reached in epoch %d", self.scale, epoch + 1)
                break
        if mode == "synthetic" and self.comm.rank == 0:
            table = "; ".join(
                f"{c['epoch']:.0f}: image {c['image_auroc']:.3f} pixel {c['pixel_auroc']:.3f}"
                for c in self.candidates
            )
            log.info("scale %d: epoch %d selected (%s)", self.scale, self.best_epoch, table)
        return self.history

    def _candidate(self, epoch: int) -> bool:
        """Whether synthetic selection scores the weights after ``epoch``: every
        ``train.select_every``-th epoch and the run's last (the same on every rank)."""
        out_of_steps = self.t.max_steps and self.steps >= self.t.max_steps
        return epoch >= self.t.epochs or bool(out_of_steps) or epoch % self.t.select_every == 0

    def _consider(self, m: dict[str, float], mode: str) -> None:
        """Keep the current weights if they beat the best so far (ties keep the earlier)."""
        if mode == "synthetic":
            row = {k.removeprefix("sel_"): v for k, v in m.items() if k.startswith("sel_")}
            row = row or m
            self.candidates.append({"epoch": float(self.epoch), **row})
            crit = -row["score"] if math.isfinite(row["score"]) else math.inf
        elif mode == "loss":
            crit = m.get("val_score", math.nan)
            crit = crit if math.isfinite(crit) else math.inf
        else:
            crit = -float(self.epoch)
        if crit < self.best_val or self.best_state is None:
            self.best_val = crit
            self.best_epoch = self.epoch
            self.best_state = _cpu_copy(self.core.state_dict())

    def _detect(self, sel: SelectionSet | None) -> dict[str, float]:
        """Synthetic-anomaly detection metrics of the current encoder, computed where
        ``sel`` is (rank 0) and summed to every rank. Collective."""
        v = torch.zeros(4, dtype=torch.float64)
        if sel is not None:
            maps = scale_maps(self.core.encoder, sel, self.cfg, self.device)
            m = detection_metrics(maps, sel, self.cfg)
            v = torch.tensor(
                [1.0, m["image_auroc"], m["pixel_auroc"], m["score"]], dtype=torch.float64
            )
        v = reduce_sum(self.comm, v)
        if v[0] < 1:
            return {"image_auroc": math.nan, "pixel_auroc": math.nan, "score": math.nan}
        v = v / v[0]
        return {"image_auroc": float(v[1]), "pixel_auroc": float(v[2]), "score": float(v[3])}

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
            "candidates": self.candidates,
            "selection_info": self.selection_info,
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
        self.candidates = list(state.get("candidates", []))
        self.selection_info = state.get("selection_info")


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in copy.copy(state).items()}


def train_scale(
    cfg: MSPrayConfig,
    scale: int,
    train_images: torch.Tensor,
    val_images: torch.Tensor | None,
    vgg_state: dict | None = None,
    stem: dict[str, torch.Tensor] | None = None,
) -> tuple[ScaleModel, list[dict[str, float]]]:
    """Train one scale on one process (from the shared ``stem`` when given); returns the
    selected model (lowest validation score) and the per-epoch history."""
    device = resolve_device(cfg.train.device)
    model = build_scale_model(cfg, scale, vgg_state, stem).to(device)
    trainer = ScaleTrainer(cfg, scale, model, device)
    history = trainer.fit(train_images, val_images)
    best = build_scale_model(cfg, scale, None)
    best.load_state_dict(trainer.best_model_state())
    best.train_summary = run_summary(history, cfg, trainer.candidates, scale)  # for meta.json
    best.train_summary["selection_set"] = trainer.selection_info
    return best, history
