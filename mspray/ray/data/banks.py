"""The bank steps on Ray: embed normal images on a Ray Data actor pool, coreset as Ray tasks.

Actors (detector loaded once each) read and embed a batch of training images at every
scale. When a scale's patches would not fit the global coreset's candidate budget
(``bank.coreset_max_candidates``), each batch is first reduced on its actor by a greedy
k-center coreset (per shard); the global coreset over the union (:meth:`PatchBank.build`,
up to that budget of candidates per scale) then runs as a Ray task per scale on a worker,
not in the driver (often a head node with no CPU to spare), with the ratio adjusted so the
bank ends up with ``coreset_ratio`` × (all patches) rows. Small banks skip the per-shard
step, which makes the result identical to the core's :meth:`Detector.build_banks` on the
same images. The pipeline (:mod:`mspray.pipeline.steps`) calls these through
:class:`mspray.ray.executor.RayExecutor`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mspray.bank import PatchBank, global_bank_config
from mspray.bank.coreset import greedy_coreset
from mspray.config import BankConfig, MSPrayConfig, PoolConfig
from mspray.ray.data.decoded import decoded_units, lookup, stack, units_of
from mspray.ray.runtime import DetectorActor, gpus_per_actor, map_with_detector

log = logging.getLogger(__name__)


class Embedder(DetectorActor):
    """Ray Data actor: decoded units (:func:`~mspray.ray.data.decoded.decoded_units`) -> one
    row per kept patch embedding (``scale``, ``idx``, ``emb``), plus one row with ``error``
    set per unreadable image; ``idx`` is the image's place in the driver's list
    (``positions``: path -> place, through the object store)."""

    with_banks = False

    def __init__(
        self, keep: dict[str, float], scales: list[int], positions: Any, **actor: Any
    ) -> None:
        super().__init__(**actor)
        self.keep = {int(s): r for s, r in keep.items()}
        self.scales = [int(s) for s in scales]
        self.positions = lookup(positions)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        cfg = self.det.cfg
        size = cfg.model.image_size
        loaded = stack(units_of(batch, size), size)
        idx = [self.positions[u] for u in loaded.uris]
        dim = cfg.model.embed_dim
        scales, ids, embs, errors = [], [], [], []
        for i, err in zip(idx, loaded.errors, strict=True):
            if err is not None:
                scales.append(np.array([-1], np.int32))
                ids.append(np.array([i], np.int64))
                embs.append(np.zeros((1, dim), np.float32))
                errors.append(err)
        good = [idx[k] for k in loaded.ok]
        per_scale = self.det.bank_embeddings_scales(loaded.images, self.scales) if good else {}
        for s, emb in per_scale.items():
            per_image = emb.shape[0] // len(good)
            rows = np.repeat(np.asarray(good, np.int64), per_image)
            keep = self.keep.get(s, 1.0)
            if keep < 1.0:
                # seeded by the shard's first image: the same shard is reduced the same way
                x = torch.from_numpy(emb).to(self.det.device)  # on the actor's GPU if any
                sel = greedy_coreset(x, math.ceil(keep * len(emb)), seed=cfg.train.seed + good[0])
                sel = np.sort(sel.cpu().numpy())  # keep image order for the global step
                emb, rows = emb[sel], rows[sel]
            scales.append(np.full(len(emb), s, np.int32))
            ids.append(rows)
            embs.append(emb)
        n_err = len(errors)
        total = sum(len(a) for a in ids)
        return {
            "scale": np.concatenate(scales) if scales else np.zeros(0, np.int32),
            "idx": np.concatenate(ids) if ids else np.zeros(0, np.int64),
            "emb": np.concatenate(embs) if embs else np.zeros((0, dim), np.float32),
            "error": np.array(errors + [None] * (total - n_err), dtype=object),
        }


def embed_images(
    bundle: str,
    cfg: MSPrayConfig,
    uris: list[str],
    keep: dict[int, float],
    pool: PoolConfig,
    scales: tuple[int, ...] | None = None,
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], list[str]]:
    """Per-scale embeddings of ``uris`` (after the per-shard coreset given by ``keep``), in
    image order, the index (into ``uris``) of the image of each row, and the error
    messages of the images that could not be read. ``scales``: default all of the model's."""
    scales = tuple(scales or cfg.model.scales)
    import ray

    ds = map_with_detector(
        decoded_units(uris, cfg, pool),  # read and decoded by CPU tasks, as scoring's
        Embedder,
        bundle,
        cfg,
        pool,
        n_items=math.ceil(len(uris) / cfg.score.batch_size),
        batch_size=1,  # one decoded unit per call
        batch_format="pyarrow",
        keep={str(s): r for s, r in keep.items()},
        scales=list(scales),
        positions=ray.put({p: i for i, p in enumerate(uris)}),
    )
    parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in scales}
    errors: list[str] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        scale = batch["scale"]
        bad = scale < 0
        errors.extend(str(e) for e in batch["error"][bad])
        for s in parts:
            m = scale == s
            if m.any():
                parts[s].append((batch["idx"][m], batch["emb"][m]))
    out, owners = {}, {}
    for s, chunks in parts.items():
        if not chunks:
            continue
        idx = np.concatenate([c[0] for c in chunks])
        emb = np.concatenate([c[1] for c in chunks])
        # stable: patches of one image stay in their grid order
        order = np.argsort(idx, kind="stable")
        out[s] = np.ascontiguousarray(emb[order], dtype=np.float32)
        owners[s] = idx[order]
    return out, owners, errors


def _bank_on_worker(
    emb: np.ndarray,
    bank_cfg: BankConfig,
    seed: int,
    existing: tuple[bytes, BankConfig] | None,
    threads: int,
) -> tuple[bytes, int]:
    """Ray task: one scale's global coreset and index, on a worker. Builds a bank from
    ``emb`` or, with ``existing`` (a serialized bank and its config), extends that one
    (:meth:`PatchBank.add`); returns the serialized bank and how many rows it got."""
    torch.set_num_threads(threads)
    if existing is None:
        bank = PatchBank.build(emb, bank_cfg, seed=seed)
        return bank.to_bytes(), bank.ntotal
    bank = PatchBank.from_bytes(*existing)
    added = bank.add(emb, bank_cfg)
    return bank.to_bytes(), added


def global_coreset(
    det,
    embs: dict[int, np.ndarray],
    totals: dict[int, int],
    pool: PoolConfig,
    *,
    append: bool,
    append_all: bool,
) -> None:
    """Replace (or, with ``append``, extend) ``det``'s bank of every scale with the global
    coreset of the shards' rows ``embs`` (``totals``: the patches they came from). The
    coreset runs in one Ray task per scale, with the resources of one pool actor; the
    driver only ships the rows and loads the finished banks. ``append_all`` adds every row
    (no coreset: a plain index add, on the driver)."""
    import ray

    cfg = det.cfg
    gpus = gpus_per_actor(pool, cfg)
    resources: dict[str, Any] = {"num_cpus": pool.cpus_per_worker}
    if gpus > 0:
        resources["num_gpus"] = gpus
    task = ray.remote(_bank_on_worker).options(**resources)
    threads = max(1, int(pool.cpus_per_worker))
    pending = {}
    for s in det.scales:
        if append and append_all:
            added = det.banks[s].add(embs[s])
            log.info("scale %d: added %d patches (bank now %d)", s, added, det.banks[s].ntotal)
            continue
        bank_cfg = global_bank_config(cfg.bank, totals[s], len(embs[s]))
        existing = (det.banks[s].to_bytes(), det.banks[s].cfg) if append else None
        pending[s] = (task.remote(embs[s], bank_cfg, cfg.train.seed, existing, threads), bank_cfg)
    for s, (ref, bank_cfg) in pending.items():
        data, rows = ray.get(ref)
        if append:
            det.banks[s] = PatchBank.from_bytes(data, det.banks[s].cfg)
            log.info(
                "scale %d: added %d of %d patches (bank now %d)",
                s,
                rows,
                totals[s],
                det.banks[s].ntotal,
            )
        else:
            det.banks[s] = PatchBank.from_bytes(data, bank_cfg)
            log.info("scale %d: bank of %d from %d patches", s, rows, totals[s])
