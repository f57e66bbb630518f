"""Fitting a detector: one sequence of named steps, written once, run by an executor.

``split → train → select → embed → coreset → calibrate → save``

- **split**: the normal images into bank images and held-out ones (deterministic); the
  ImageNet trunk weights are loaded here, once, and handed to the training step;
- **train**: with ``train.stage_one`` and no ImageNet weights, the trunk first learns to
  tell normal images from synthetic anomalies; then every scale's encoder, the shared
  stem's scale first;
- **select**: the fused check, the selected encoders against the untrained ones on
  synthetic anomalies (per-scale choices need not add up);
- **embed**: the bank images' patch embeddings at every scale;
- **coreset**: the banks (greedy k-center coreset, then the index);
- **calibrate**: threshold and fusion stats the configured way, near-duplicates kept apart;
  with nothing held out of the bank, on the bank images, with a warning;
- **save**: a new bundle version.

:func:`fit_detector` runs them all; :func:`build_banks` runs the last four on a saved
bundle's encoders (``mspray build-bank``). Where each step runs is the executor's choice
(:mod:`mspray.pipeline.executor`): in this process, or on Ray. Both record the same steps in
the same order in ``meta.json`` (``pipeline``), with their seconds.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mspray import storage
from mspray.bank import global_bank_config, shard_keep_ratio
from mspray.config import BankConfig, MSPrayConfig
from mspray.detector import Detector
from mspray.device import resolve_device
from mspray.model.backbone import PretrainedWeightsError, load_vgg16_state
from mspray.model.multiscale import MultiScaleEncoder, ScaleModel, build_scale_model
from mspray.pipeline.executor import Embeddings, Executor, LocalExecutor
from mspray.train.recipes import no_imagenet_defaults

log = logging.getLogger(__name__)

#: Every step, in the order they run.
STEPS = ("split", "train", "select", "embed", "coreset", "calibrate", "save")


@dataclass
class StepLog:
    """What each step of one run did: ``[{"step", "seconds", ...info}]``, in run order."""

    executor: str
    records: list[dict[str, Any]] = field(default_factory=list)

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """Time the step ``name``; the caller fills the yielded dict with what it did."""
        if name not in STEPS:
            raise ValueError(f"unknown pipeline step {name!r}")
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        yield info
        seconds = time.perf_counter() - t0
        self.records.append({"step": name, "seconds": round(seconds, 3), **info})
        detail = ", ".join(f"{k} {v}" for k, v in info.items())
        log.info(
            "step %s [%s]: %.1f s%s", name, self.executor, seconds, f" ({detail})" * bool(detail)
        )

    def skip(self, name: str, why: str) -> None:
        """Record ``name`` as not run, and why."""
        with self.step(name) as info:
            info["skipped"] = why

    def to_meta(self) -> dict[str, Any]:
        return {"executor": self.executor, "steps": list(self.records)}


def split_holdout(paths: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split of normal training images into (train, held-out validation).

    At least one image is held out whenever there are two or more and ``fraction > 0``: the
    held-out images select the checkpoint and calibrate the threshold, so they must not be
    in the bank.
    """
    paths = sorted(paths)
    n_val = 0 if fraction <= 0 or len(paths) < 2 else max(1, math.floor(fraction * len(paths)))
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    val = sorted(paths[i] for i in order[:n_val])
    train = sorted(paths[i] for i in order[n_val:])
    return train, val


def backbone_state(cfg: MSPrayConfig) -> tuple[dict | None, bool]:
    """ImageNet VGG16 weights when the config asks for them: (state or None, loaded?)."""
    if not cfg.model.pretrained:
        return None, False
    try:
        return load_vgg16_state(cfg.model.weights_path), True
    except PretrainedWeightsError as e:
        if not cfg.model.pretrained_fallback:
            raise
        log.warning(
            "ImageNet weights unavailable (%s); training from random init. "
            "Set model.pretrained_fallback=false to make this an error.",
            e,
        )
        return None, False


def select_step(
    ex: Executor,
    cfg: MSPrayConfig,
    models: dict[int, ScaleModel],
    state: dict | None,
    train_uris: list[str],
    val_uris: list[str],
    run: StepLog,
) -> tuple[dict[int, ScaleModel], dict | None]:
    """The fused check: the trained encoders against the untrained ones (rebuilt from the
    same seed), on synthetic anomalies in the held-out images. Returns the kept models and
    the check's table (None when it did not run)."""
    if cfg.train.selection != "synthetic":
        run.skip("select", f"train.selection={cfg.train.selection}")
        return models, None
    if cfg.train.epochs <= 0:
        run.skip("select", "nothing trained (train.epochs=0)")
        return models, None
    if not val_uris:
        run.skip("select", "no held-out images")
        return models, None
    with run.step("select") as info:
        untrained = {s: build_scale_model(cfg, s, state) for s in cfg.model.scales}
        pick, table = ex.select(
            cfg, {"selected": models, "untrained": untrained}, train_uris, val_uris
        )
        info["kept"] = pick
        log.info("fused synthetic-anomaly check: %s kept (%s)", pick, table[pick]["score"])
    if pick == "untrained":
        for s, m in untrained.items():
            m.train_summary = getattr(models[s], "train_summary", None)
        models = untrained
    return models, {"fused": table, "choice": pick}


def patches_per_image(det: Detector) -> dict[int, int]:
    """Bank rows one image gives at every scale."""
    size = det.cfg.model.image_size
    probe = torch.zeros(1, 3, size, size)
    return {s: len(e) for s, e in det.bank_embeddings_scales(probe).items()}


def bank_steps(
    ex: Executor,
    det: Detector,
    run: StepLog,
    bank_uris: list[str],
    val_uris: list[str],
    *,
    source: str | None = None,
    out: str | None = None,
    append: bool = False,
    append_all: bool = False,
    calibrate: bool = True,
) -> list[str]:
    """embed → coreset → calibrate on ``det``; returns the messages of the unreadable bank
    images (skipped).
    ``source``: a saved version that holds ``det``'s encoders (where workers load them)."""
    per_image = patches_per_image(det)
    totals = {s: per_image[s] * len(bank_uris) for s in det.scales}
    keep = {s: 1.0 if append_all else shard_keep_ratio(det.cfg.bank, totals[s]) for s in totals}
    model = ex.model_uri(det, source, out)
    with run.step("embed") as info:
        emb = ex.embed(det, model, bank_uris, keep)
        n_good = len(bank_uris) - len(emb.errors)
        info.update(images=n_good, errors=len(emb.errors))
    if emb.errors:
        log.warning("%d unreadable images skipped, e.g. %s", len(emb.errors), emb.errors[0])
    if n_good == 0:
        raise ValueError(f"none of the {len(bank_uris)} images could be read: {emb.errors[0]}")
    with run.step("coreset") as info:
        patches = {s: per_image[s] * n_good for s in det.scales}
        ex.coreset(det, emb.rows, patches, append=append, append_all=append_all)
        info["bank_rows"] = {str(s): b.ntotal for s, b in det.banks.items()}
    if append:
        run.skip("calibrate", "appended to the banks: the threshold is kept")
    elif not calibrate:
        run.skip("calibrate", "asked not to (the threshold is kept)")
    else:
        with run.step("calibrate") as info:
            info["source"] = calibrate_step(ex, det, model, bank_uris, val_uris, emb, per_image)
    return emb.errors


def calibrate_step(
    ex: Executor,
    det: Detector,
    model: str | None,
    bank_uris: list[str],
    val_uris: list[str],
    emb: Embeddings,
    per_image: dict[int, int],
) -> str:
    """Calibrate over the readable bank images and the held-out ones (all in sorted-name
    order: cross-calibration folds are name blocks); with nothing held out, on the bank
    images. Returns the calibration's source."""
    good = np.unique(np.concatenate([emb.owners[s] for s in det.scales]))  # readable ones
    names = [bank_uris[i] for i in good] + list(val_uris)
    order = np.argsort(names, kind="stable")
    position = np.empty(len(order), np.int64)
    position[order] = np.arange(len(order))  # names[j] is image position[j] of the sorted set
    embeddings = {
        s: (emb.rows[s], position[np.searchsorted(good, emb.owners[s])]) for s in det.scales
    }

    def fold_bank_config(scale: int, n_images: int, rows: int) -> BankConfig:
        # the fold's rows went through the same per-shard reduction as the full bank's
        return global_bank_config(det.cfg.bank, per_image[scale] * n_images, rows)

    sorted_names = [names[j] for j in order]
    in_bank = order < len(good)
    cal = ex.calibrate(det, model, sorted_names, in_bank, embeddings, fold_bank_config, "auto")
    if cal is None:
        log.warning(
            "no normal image outside the bank to calibrate on (too few images, or "
            "calibration='holdout' with val_fraction=0): calibrating the threshold on "
            "the bank images (the threshold will be low)"
        )
        bank_names = [bank_uris[i] for i in good]
        cal = ex.calibrate(
            det, model, bank_names, np.ones(len(good), bool), embeddings, fold_bank_config, "bank"
        )
    return cal.source


def fit_detector(
    cfg: MSPrayConfig,
    image_uris: list[str],
    out: str | None = None,
    executor: Executor | None = None,
    build_banks: bool = True,
) -> Detector:
    """Train on normal ``image_uris`` and, with ``build_banks``, build the banks from the
    training split and calibrate the threshold; save a bundle to ``out`` when given.

    ``executor``: where the steps run (default: :class:`LocalExecutor`, this process).
    With ``build_banks=False`` only the encoders are trained and saved: a version without
    banks, which ``latest`` never names; :func:`build_banks` completes it later.
    """
    if not image_uris:
        raise ValueError("no training images")
    ex = executor or LocalExecutor()
    run = StepLog(ex.name)
    with run.step("split") as info:
        train_uris, val_uris = split_holdout(image_uris, cfg.train.val_fraction, cfg.train.seed)
        state, loaded = backbone_state(cfg)
        cfg = no_imagenet_defaults(cfg, loaded)  # a random-init trunk trains with its own lr
        info.update(bank=len(train_uris), held_out=len(val_uris), pretrained=loaded)
    stage_one = None
    with run.step("train") as info:
        if cfg.train.stage_one and not loaded:
            # the trunk learns normal vs synthetic anomalies before the per-scale encoders
            state, stage_one = ex.stage_one(cfg, train_uris, state)
            info["stage_one"] = True
        models = ex.train_scales(cfg, train_uris, val_uris, state)
        info["scales"] = sorted(models)
    models, selection = select_step(ex, cfg, models, state, train_uris, val_uris, run)
    det = Detector(cfg, MultiScaleEncoder(cfg, models), device=resolve_device(cfg.train.device))
    det.meta.update(
        pretrained_loaded=loaded,
        n_train_images=len(train_uris),
        n_holdout_images=len(val_uris),
        # Per scale: epochs and steps run, why training stopped, the selected epoch, history.
        training={str(s): getattr(m, "train_summary", None) for s, m in models.items()},
        selection=selection,  # fused: selected vs untrained encoders on synthetic anomalies
        stage_one=stage_one,  # the trunk's self-supervised stage (None: not run)
    )
    if build_banks:
        errors = bank_steps(ex, det, run, train_uris, val_uris, out=out)
        det.meta["n_train_images"] = len(train_uris) - len(errors)
    else:
        for name in ("embed", "coreset", "calibrate"):
            run.skip(name, "encoders only (build_banks=False)")
    save_step(det, out, run)
    return det


def save_step(det: Detector, out: str | None, run: StepLog) -> str | None:
    """Save ``det`` under the bundle root ``out`` (when given), the step records in its
    ``meta.json``; returns the version URI."""
    from mspray.artifacts.bundle import save_bundle

    det.meta["pipeline"] = run.to_meta()
    if not out:
        run.skip("save", "no output given")
        return None
    with run.step("save") as info:
        uri = save_bundle(det, out)
        info["version"] = det.version
    return uri


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
    calibration: str | None = None  # the calibration's source (None: threshold kept)
    errors: list[str] = field(default_factory=list)  # the first few error messages
    steps: list[dict[str, Any]] = field(default_factory=list)


def build_banks(
    bundle: str,
    uris: list[str],
    executor: Executor,
    out: str | None = None,
    *,
    append: bool = False,
    append_all: bool = False,
    calibrate: bool = True,
    overrides: dict[str, Any] | None = None,
) -> BankBuildResult:
    """Build (or, with ``append``, extend) the banks of ``bundle`` from normal images.

    Without ``append`` the images are split like training does (same held-out fraction and
    seed): the bank is built from the training part and, with ``calibrate``, the threshold
    and fusion stats are recomputed the configured way. With ``append`` every image goes
    into the banks and the threshold is kept (new normal patches can only lower distances).

    The result is a new version under the bundle root ``out`` (default: the root of
    ``bundle``) and ``latest`` moves to it; the version it started from is never modified.
    """
    from mspray.artifacts.bundle import bundle_root, load_bundle, load_config, resolve_bundle

    if not uris:
        raise ValueError("no images to put in the banks")
    t0 = time.perf_counter()
    target = out or bundle_root(bundle)
    source = resolve_bundle(bundle)  # the driver and every worker use this one version
    cfg = load_config(source, overrides)
    det = load_bundle(source, with_banks=append, config=cfg)
    run = StepLog(executor.name)
    with run.step("split") as info:
        if append:
            bank_uris, val_uris = sorted(uris), []
        else:
            bank_uris, val_uris = split_holdout(uris, cfg.train.val_fraction, cfg.train.seed)
        info.update(bank=len(bank_uris), held_out=len(val_uris))
    run.skip("train", "encoders from " + source)
    run.skip("select", "encoders from " + source)
    errors = bank_steps(
        executor,
        det,
        run,
        bank_uris,
        val_uris,
        source=source,
        out=target,
        append=append,
        append_all=append_all,
        calibrate=calibrate,
    )
    n_good = len(bank_uris) - len(errors)
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
    saved = save_step(det, target, run)
    cal = next(r for r in run.records if r["step"] == "calibrate")
    return BankBuildResult(
        out=storage.normalize(target),
        version=det.version,
        version_uri=saved,
        source=source,
        bank_sizes={s: b.ntotal for s, b in det.banks.items()},
        n_images=n_good,
        n_errors=len(errors),
        threshold=det.threshold,
        appended=append,
        seconds=time.perf_counter() - t0,
        calibration=cal.get("source"),
        errors=errors[:10],
        steps=run.records,
    )
