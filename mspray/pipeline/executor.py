"""Where the pipeline's heavy steps run: the executor interface and the in-process executor.

An executor runs the steps of :mod:`mspray.pipeline.steps` that touch images or train:
training the scales, the fused selection check, embedding the bank images, the coreset
and the calibration scoring. The pipeline decides *what* happens and in which order; an
executor only decides *where*. :class:`LocalExecutor` runs everything in this process;
:class:`mspray.ray.executor.RayExecutor` runs the same core calls on Ray (Train for the
scales, Data for embedding and calibration, tasks for the coreset and the selection).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from mspray.bank import PatchBank, global_bank_config
from mspray.config import MSPrayConfig
from mspray.data.images import load_images
from mspray.decisions.calibration import FoldBankConfig, calibrate_normal_images
from mspray.decisions.summaries import calibrate
from mspray.decisions.threshold import Calibration
from mspray.detector import Detector
from mspray.device import resolve_device
from mspray.model.multiscale import ScaleModel, stem_scale, stem_state, training_order
from mspray.train.loop import train_scale
from mspray.train.selection import fused_choice
from mspray.train.stage_one import train_stage_one

log = logging.getLogger(__name__)

#: {candidate name: {scale: model}} ranked by the fused synthetic-anomaly check
Candidates = dict[str, dict[int, ScaleModel]]


@dataclass
class Embeddings:
    """Bank embeddings of a list of images: per scale the rows (image order), the index
    (into that list) of each row's image, and the messages of unreadable images."""

    rows: dict[int, np.ndarray]
    owners: dict[int, np.ndarray]
    errors: list[str] = field(default_factory=list)


class Executor(Protocol):
    """Runs the pipeline's heavy steps somewhere (see the module docstring)."""

    #: Shown in the step records and the log.
    name: str

    def train_scales(
        self, cfg: MSPrayConfig, train_uris: list[str], val_uris: list[str], state: dict | None
    ) -> dict[int, ScaleModel]:
        """Every scale's trained model (the shared stem's scale first), from the trunk
        weights ``state`` (None: random init)."""
        ...

    def stage_one(
        self, cfg: MSPrayConfig, train_uris: list[str], state: dict | None
    ) -> tuple[dict, dict]:
        """:func:`mspray.train.stage_one.train_stage_one` on the training images: the
        trained trunk (``features.*``) and its summary."""
        ...

    def select(
        self,
        cfg: MSPrayConfig,
        candidates: Candidates,
        train_uris: list[str],
        val_uris: list[str],
    ) -> tuple[str, dict[str, dict]]:
        """:func:`mspray.train.selection.fused_choice` of ``candidates``."""
        ...

    def model_uri(self, det: Detector, source: str | None, out: str | None) -> str | None:
        """Where the executor's workers load ``det``'s encoders from (``source``: a saved
        version holding them, if any; ``out``: the bundle root to stage them under)."""
        ...

    def embed(
        self, det: Detector, model: str | None, uris: list[str], keep: dict[int, float]
    ) -> Embeddings:
        """Bank embeddings of ``uris`` at every scale, each shard of images first reduced
        by a coreset to the ``keep`` ratio of its rows (1: all rows)."""
        ...

    def coreset(
        self,
        det: Detector,
        rows: dict[int, np.ndarray],
        totals: dict[int, int],
        *,
        append: bool,
        append_all: bool,
    ) -> None:
        """Replace (``append``: extend) ``det``'s banks with the global coreset of ``rows``
        (``totals``: the patches they came from); ``append_all`` adds every row."""
        ...

    def calibrate(
        self,
        det: Detector,
        model: str | None,
        names: list[str],
        in_bank: np.ndarray,
        embeddings: dict[int, tuple[np.ndarray, np.ndarray]],
        bank_config: FoldBankConfig,
        source: str,
    ) -> Calibration | None:
        """Calibrate ``det`` on its normal images ``names`` (sorted): ``source="auto"`` the
        configured way (None when nothing is held out of the bank), ``"bank"`` on the
        bank images against the full banks."""
        ...


def coreset_banks(
    det: Detector,
    rows: dict[int, np.ndarray],
    totals: dict[int, int],
    *,
    append: bool,
    append_all: bool,
) -> None:
    """:meth:`Executor.coreset` in this process (one scale after another)."""
    cfg = det.cfg
    for s in det.scales:
        if append:
            bank_cfg = None if append_all else global_bank_config(cfg.bank, totals[s], len(rows[s]))
            added = det.banks[s].add(rows[s], bank_cfg)
            log.info("scale %d: added %d of %d patches", s, added, totals[s])
        else:
            bank_cfg = global_bank_config(cfg.bank, totals[s], len(rows[s]))
            det.banks[s] = PatchBank.build(rows[s], bank_cfg, seed=cfg.train.seed)
            log.info("scale %d: bank of %d from %d patches", s, det.banks[s].ntotal, totals[s])


def train_scales(
    cfg: MSPrayConfig,
    train: torch.Tensor,
    val: torch.Tensor | None,
    state: dict | None,
) -> dict[int, ScaleModel]:
    """Every scale trained one after another in this process on normal ``train`` images
    (``val``: held out, for selection), the shared stem's scale first and the others from
    its trained stem."""
    models, stem = {}, None
    for scale in training_order(cfg):
        models[scale], history = train_scale(cfg, scale, train, val, state, stem)
        if scale == stem_scale(cfg):
            stem = stem_state(models[scale])
        if history:
            last = history[-1]
            log.info(
                "scale %d: loss %.4f, epoch %d selected (%s)",
                scale,
                last["loss"],
                last["best_epoch"],
                cfg.train.selection,
            )
    return models


class LocalExecutor:
    """Every step in this process. Images are decoded once and kept for later steps."""

    name = "local"

    def __init__(self) -> None:
        self._images: dict[str, torch.Tensor] = {}

    def images(self, uris: list[str], desc: str = "loading images") -> torch.Tensor:
        """``uris`` as one ``N×3×H×W`` tensor; each image decoded at most once."""
        missing = [u for u in dict.fromkeys(uris) if u not in self._images]
        if missing:
            size = self._size
            loaded = load_images(missing, size, desc=desc)
            self._images.update(zip(missing, loaded, strict=True))
        if not uris:
            return torch.empty(0, 3, self._size, self._size)
        return torch.stack([self._images[u] for u in uris])

    def train_scales(
        self, cfg: MSPrayConfig, train_uris: list[str], val_uris: list[str], state: dict | None
    ) -> dict[int, ScaleModel]:
        self._size = cfg.model.image_size
        train = self.images(train_uris, "loading train images")
        val = self.images(val_uris) if val_uris else None
        return train_scales(cfg, train, val, state)

    def stage_one(
        self, cfg: MSPrayConfig, train_uris: list[str], state: dict | None
    ) -> tuple[dict, dict]:
        self._size = cfg.model.image_size
        images = self.images(train_uris, "loading train images")
        device = resolve_device(cfg.train.device)
        return train_stage_one(cfg, images, state, device)

    def select(
        self,
        cfg: MSPrayConfig,
        candidates: Candidates,
        train_uris: list[str],
        val_uris: list[str],
    ) -> tuple[str, dict[str, dict]]:
        self._size = cfg.model.image_size
        encoders = {k: {s: m.encoder for s, m in c.items()} for k, c in candidates.items()}
        train, val = self.images(train_uris), self.images(val_uris)
        return fused_choice(cfg, encoders, train, val, resolve_device(cfg.train.device))

    def model_uri(self, det: Detector, source: str | None, out: str | None) -> str | None:
        return None  # the detector is in this process

    def embed(
        self, det: Detector, model: str | None, uris: list[str], keep: dict[int, float]
    ) -> Embeddings:
        # One process holds every row: no per-shard reduction is needed (``keep`` is the
        # budget for shards that reach a driver), the global coreset sees them all.
        self._size = det.cfg.model.image_size
        images = self.images(uris, "loading bank images")
        rows = det.bank_embeddings_batched(images)
        n = len(uris)
        owners = {s: np.repeat(np.arange(n), len(r) // max(n, 1)) for s, r in rows.items()}
        return Embeddings(rows, owners)

    def coreset(
        self,
        det: Detector,
        rows: dict[int, np.ndarray],
        totals: dict[int, int],
        *,
        append: bool,
        append_all: bool,
    ) -> None:
        coreset_banks(det, rows, totals, append=append, append_all=append_all)

    def calibrate(
        self,
        det: Detector,
        model: str | None,
        names: list[str],
        in_bank: np.ndarray,
        embeddings: dict[int, tuple[np.ndarray, np.ndarray]],
        bank_config: FoldBankConfig,
        source: str,
    ) -> Calibration | None:
        self._size = det.cfg.model.image_size
        images = self.images(names)
        if source == "bank":
            return calibrate(det, images, source="bank")
        return calibrate_normal_images(det, images, in_bank, embeddings, bank_config)
