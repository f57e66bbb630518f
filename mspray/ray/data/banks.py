"""Bank building with Ray Data: embed normal images on an actor pool, coreset, write banks.

Actors (detector loaded once each) read and embed a batch of training images at every
scale. When a scale's patches would not fit the global coreset's candidate budget
(``bank.coreset_max_candidates``), each batch is first reduced on its actor by a greedy
k-center coreset (per shard); the global coreset over the union (:meth:`PatchBank.build`,
up to that budget of candidates per scale) then runs as a Ray task per scale on a worker,
not in the driver (often a head node with no CPU to spare), with the ratio adjusted so the
bank ends up with ``coreset_ratio`` × (all patches) rows. Small banks skip the per-shard
step, which makes the result identical to the core's :meth:`Detector.build_banks` on the
same images.

``append=True`` adds new normal images to a bundle's existing banks without retraining:
their patches go through the same coreset (picks start from the existing bank's coverage,
see :meth:`PatchBank.add`), or all of them with ``append_all``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mspray import storage
from mspray.bank import PatchBank
from mspray.bundle import load_config
from mspray.config import BankConfig, MSPrayConfig, PoolConfig
from mspray.coreset import greedy_coreset
from mspray.ray.data.reading import iter_loaded
from mspray.ray.runtime import (
    DetectorActor,
    gpus_per_actor,
    init_ray,
    map_with_detector,
)

log = logging.getLogger(__name__)


def shard_keep_ratio(cfg: BankConfig, total_rows: int) -> float:
    """Fraction of each shard's patches kept by the per-shard coreset: 1 while all patches
    fit the global candidate budget, else ``coreset_max_candidates / total_rows``, so that
    at most the budget (plus one row per shard, from rounding) ever reaches the driver,
    however many images there are."""
    if cfg.coreset_ratio >= 1.0 or total_rows <= cfg.coreset_max_candidates:
        return 1.0
    return cfg.coreset_max_candidates / total_rows


def global_bank_config(cfg: BankConfig, total_rows: int, union_rows: int) -> BankConfig:
    """Bank config for the global coreset over ``union_rows`` shard-reduced rows, so that it
    keeps ``ceil(coreset_ratio × total_rows)`` of them, as a one-step coreset would."""
    if cfg.coreset_ratio >= 1.0 or union_rows == total_rows or union_rows == 0:
        return cfg
    target = math.ceil(cfg.coreset_ratio * total_rows)
    return cfg.replace(coreset_ratio=min(1.0, target / union_rows))


class Embedder(DetectorActor):
    """Ray Data actor: batch of (idx, path) rows -> one row per kept patch embedding
    (``scale``, ``idx``, ``emb``), plus one row with ``error`` set per unreadable image."""

    with_banks = False

    def __init__(self, keep: dict[str, float], scales: list[int], **actor: Any) -> None:
        super().__init__(**actor)
        self.keep = {int(s): r for s, r in keep.items()}
        self.scales = [int(s) for s in scales]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.det.cfg
        idx = [int(i) for i in batch["idx"]]
        uris = [str(p) for p in batch["path"]]
        (loaded,) = iter_loaded(uris, len(uris), cfg.model.image_size, cfg.score, self.io)
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


@dataclass
class BankBuildResult:
    """What a bank build/append did."""

    out: str  # the bundle root the new version was saved under
    version: str
    version_uri: str  # the new version (out/versions/<version>), what `latest` now names
    source: str  # the version the build started from
    bank_sizes: dict[int, int]
    n_images: int  # images embedded (bank images; held-out ones are not counted)
    n_errors: int  # unreadable images, skipped
    threshold: float | None
    appended: bool
    seconds: float
    errors: list[str] = field(default_factory=list)  # the first few error messages


def _patches_per_image(det, scales: tuple[int, ...]) -> dict[int, int]:
    size = det.cfg.model.image_size
    probe = torch.zeros(1, 3, size, size)
    return {s: int(det.bank_embeddings(probe, s).shape[0]) for s in scales}


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

    ds = ray.data.from_items([{"idx": i, "path": p} for i, p in enumerate(uris)])
    ds = map_with_detector(
        ds,
        Embedder,
        bundle,
        cfg,
        pool,
        n_items=math.ceil(len(uris) / cfg.score.batch_size),
        batch_size=cfg.score.batch_size,
        batch_format="numpy",
        io_threads=pool.io_threads,
        keep={str(s): r for s, r in keep.items()},
        scales=list(scales),
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


def _calibrate(
    det,
    bundle: str,
    bank_uris: list[str],
    val_uris: list[str],
    embs: dict[int, np.ndarray],
    owners: dict[int, np.ndarray],
    per_image: dict[int, int],
    pool: PoolConfig,
):
    """Calibration the configured way over the readable bank images and the held-out ones,
    scored on the actor pool (:func:`mspray.ray.data.calibration.calibrate_on_pool`), from
    the actors' bank embeddings."""
    from mspray.ray.data.calibration import calibrate_on_pool

    good = np.unique(np.concatenate([owners[s] for s in det.scales]))  # readable bank images
    names = [bank_uris[i] for i in good] + list(val_uris)
    order = np.argsort(names, kind="stable")
    position = np.empty(len(order), np.int64)
    position[order] = np.arange(len(order))  # names[j] is image position[j] of the sorted set
    embeddings = {s: (embs[s], position[np.searchsorted(good, owners[s])]) for s in det.scales}

    def fold_bank_config(scale: int, n_images: int, rows: int) -> BankConfig:
        # the fold's rows went through the same per-shard reduction as the full bank's
        return global_bank_config(det.cfg.bank, per_image[scale] * n_images, rows)

    def embed(uris, keep, scales):
        return embed_images(bundle, det.cfg, uris, keep, pool, scales)

    return calibrate_on_pool(
        det,
        bundle,
        [names[j] for j in order],
        order < len(good),
        embeddings,
        pool,
        embed,
        fold_bank_config,
    )


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


def build_banks(
    bundle: str,
    uris: list[str],
    out: str | None = None,
    *,
    append: bool = False,
    append_all: bool = False,
    calibrate: bool = True,
    pool: PoolConfig | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    address: str | None = None,
) -> BankBuildResult:
    """Build (or, with ``append``, extend) the banks of ``bundle`` from normal images.

    Without ``append`` the images are split like training does (same held-out fraction and
    seed, see :func:`mspray.fit.split_holdout`): the bank is built from the training part
    and, with ``calibrate``, the threshold and fusion statistics are recomputed the
    configured way (``score.calibration``: cross-fitted over all the images, or on the
    held-out part), on the actor pool. With ``append`` every image goes into the banks and the
    threshold is kept (new normal patches can only lower distances).

    The result is saved as a new version under the bundle root ``out`` (default: the
    root of ``bundle``) and ``latest`` is moved to it; the version it started from is
    never modified, so a Serve deployment or a scoring run using it is unaffected.
    """
    from mspray.bundle import bundle_root, load_bundle, resolve_bundle, save_bundle
    from mspray.fit import split_holdout

    if not uris:
        raise ValueError("no images to put in the banks")
    t0 = time.perf_counter()
    pool = pool or PoolConfig()
    target = out or bundle_root(bundle)
    bundle = resolve_bundle(bundle)  # the driver and every actor use this one version
    cfg = load_config(bundle, overrides)
    det = load_bundle(bundle, with_banks=append, config=cfg)
    if append:
        bank_uris, val_uris = sorted(uris), []
    else:
        bank_uris, val_uris = split_holdout(uris, cfg.train.val_fraction, cfg.train.seed)
    per_image = _patches_per_image(det, det.scales)
    totals = {s: per_image[s] * len(bank_uris) for s in det.scales}
    keep = {s: 1.0 if append_all else shard_keep_ratio(cfg.bank, totals[s]) for s in totals}
    log.info(
        "embedding %d images at scales %s (per-shard coreset keep ratio %s)",
        len(bank_uris),
        det.scales,
        keep,
    )
    init_ray(address, progress)
    embs, owners, errors = embed_images(bundle, cfg, bank_uris, keep, pool)
    if errors:
        log.warning("%d unreadable images skipped, e.g. %s", len(errors), errors[0])
    n_good = len(bank_uris) - len(errors)
    if n_good == 0:
        raise ValueError(f"none of the {len(bank_uris)} images could be read: {errors[0]}")
    patches = {s: per_image[s] * n_good for s in det.scales}
    global_coreset(det, embs, patches, pool, append=append, append_all=append_all)
    if not append and calibrate:
        cal = _calibrate(det, bundle, bank_uris, val_uris, embs, owners, per_image, pool)
        if cal is None:
            log.warning(
                "no held-out images (fewer than 2 images or val_fraction=0): the "
                "threshold of the bundle is kept"
            )
    det.meta.setdefault("bank_builds", []).append(
        {
            "images": n_good,
            "errors": len(errors),
            "append": append,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    if not append:
        det.meta.update(n_train_images=n_good, n_holdout_images=len(val_uris))
    saved = save_bundle(det, target)
    return BankBuildResult(
        out=storage.normalize(target),
        version=det.version,
        version_uri=saved,
        source=bundle,
        bank_sizes={s: b.ntotal for s, b in det.banks.items()},
        n_images=n_good,
        n_errors=len(errors),
        threshold=det.threshold,
        appended=append,
        seconds=time.perf_counter() - t0,
        errors=errors[:10],
    )
