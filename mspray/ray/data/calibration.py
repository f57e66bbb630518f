"""Threshold calibration on the actor pool, so the driver never holds the normal images.

The same steps as the core's :func:`mspray.decisions.calibration.crossfit_calibrate` (or the
held-out
calibration), split by where the data is:

- the folds are planned from a bounded sample of the images
  (:func:`~mspray.decisions.calibration.gap_sample`, embedded by the actors): the name-order
  near-duplicate gap, and near-duplicates by content (:mod:`mspray.decisions.near_duplicates`);
- the driver builds one fold's banks at a time from the embeddings it already holds (at most
  the candidate budget per scale) and puts them in the object store;
- :class:`FoldScorer` actors read each normal image, score it against its fold's banks and
  return its :class:`~mspray.decisions.summaries.MapSummary` (pixel moments and window
  means, ~1/16 of
  the maps), which stays in the object store (``materialize``);
- the driver sums the moments into the fusion stats, then streams the summaries once more
  for one score per image: it holds one batch of summaries and a float per image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mspray.bank import PatchBank
from mspray.config import PoolConfig
from mspray.decisions.calibration import (
    FoldBankConfig,
    check_fold_plan,
    fold_banks,
    plan_folds,
    widen_for_suspects,
)
from mspray.decisions.summaries import (
    calibrate_from_summary,
    summarize_maps,
    summary_scores,
    window_grid,
)
from mspray.decisions.threshold import Calibration
from mspray.detector import Detector
from mspray.ray.data.decoded import decoded_units, lookup, stack, units_of
from mspray.ray.runtime import DetectorActor, map_with_detector

log = logging.getLogger(__name__)

#: embed(uris, keep ratio per scale, scales) -> (rows per scale, image of each row, errors):
#: the bank builder's actor stage (:func:`mspray.ray.data.banks.embed_images`)
Embed = Callable[[list[str], dict[int, float], tuple[int, ...]], tuple[dict, dict, list[str]]]


class FoldScorer(DetectorActor):
    """Ray Data actor: decoded units (:func:`~mspray.ray.data.decoded.decoded_units`) -> per
    image ``error`` ("" when read) and per scale ``moments_<s>`` and ``pooled_<s>`` (flat)
    of its raw maps against its fold's banks (``folds``: path -> fold, through the object
    store). The banks are byte blobs in the object store, loaded once per fold and actor,
    one fold at a time."""

    with_banks = False

    def __init__(self, fold_banks: list[dict[str, Any]], folds: Any, **actor: Any) -> None:
        super().__init__(**actor)
        self.fold_refs = fold_banks
        self.folds = lookup(folds)
        self.cells = int(np.prod(window_grid(self.det.cfg)))
        self._fold: tuple[int, dict[int, PatchBank]] | None = None

    def _banks(self, fold: int) -> dict[int, PatchBank]:
        import ray

        if self._fold is None or self._fold[0] != fold:
            self._fold = None  # the previous fold's banks go before the next one loads
            cfg = self.det.cfg.bank
            refs = self.fold_refs[fold]
            self._fold = (
                fold,
                {int(s): PatchBank.from_bytes(ray.get(r), cfg) for s, r in refs.items()},
            )
        return self._fold[1]

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        det = self.det
        size = det.cfg.model.image_size
        loaded = stack(units_of(batch, size), size)
        n = len(loaded.uris)
        out = {"error": np.array([e or "" for e in loaded.errors], dtype=object)}
        for s in det.scales:
            out[f"moments_{s}"] = np.zeros((n, 3))
            out[f"pooled_{s}"] = np.zeros((n, self.cells), np.float32)
        ok = np.asarray(loaded.ok, np.int64)  # batch rows that were read = rows of images
        folds = np.asarray([self.folds[loaded.uris[i]] for i in ok], np.int64)
        for fold in np.unique(folds):
            rows = np.flatnonzero(folds == fold)
            banks = self._banks(int(fold))
            x = loaded.images[torch.from_numpy(rows)]
            summary = summarize_maps(det, det.raw_scale_maps(x, banks=banks))
            for s in det.scales:
                out[f"moments_{s}"][ok[rows]] = summary.moments[s]
                out[f"pooled_{s}"][ok[rows]] = summary.pooled[s].flatten(1).numpy()
        return out


def plan_on_pool(
    det: Detector, names: list[str], embed: Embed
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """The cross-calibration folds of the sorted ``names``
    (:func:`~mspray.decisions.calibration.plan_folds`), the sampled images embedded on the actor
    pool by ``embed``."""

    def embed_sample(positions: np.ndarray, scale: int) -> np.ndarray:
        embs, _, errors = embed([names[p] for p in positions], {scale: 1.0}, (scale,))
        if errors:
            raise ValueError(f"{len(errors)} sampled images are unreadable, e.g. {errors[0]}")
        return embs[scale]

    return plan_folds(det, len(names), embed_sample)


def calibrate_on_pool(
    det: Detector,
    bundle: str,
    names: list[str],
    in_bank: np.ndarray,
    embeddings: dict[int, tuple[np.ndarray, np.ndarray]],
    pool: PoolConfig,
    embed: Embed,
    bank_config: FoldBankConfig | None = None,
    source: str = "auto",
) -> Calibration | None:
    """Calibrate ``det`` the configured way (``score.calibration``) from its normal images
    ``names`` (sorted; ``in_bank`` marks the bank ones, whose per-scale rows and image
    positions are ``embeddings``), scoring them on the actor pool with ``bundle``'s model.
    Falls back to the held-out images when there are too few to cross-fit; None when there
    is nothing to calibrate on. ``source="bank"`` scores every image of ``names`` against
    the full banks instead (the last resort when nothing is held out)."""
    import ray

    cfg = det.cfg
    in_bank = np.asarray(in_bank, bool)
    plan, info = None, {}
    if source == "bank":
        in_bank = np.zeros(len(names), bool)  # every image scored against the full banks
    elif cfg.score.calibration == "crossfit":
        try:
            plan, info = plan_on_pool(det, names, embed)
            check_fold_plan(plan, in_bank)
        except ValueError as e:
            log.warning("cross-calibration not possible (%s); using the held-out images", e)
            plan, info = None, {"fallback": f"cross-calibration not possible ({e})"}
    fold_of = np.zeros(len(names), np.int64)
    if plan is not None:
        refs = []
        for k, (scored, banks) in enumerate(
            fold_banks(det, plan, in_bank, embeddings, bank_config)
        ):
            refs.append({str(s): ray.put(b.to_bytes()) for s, b in banks.items()})
            fold_of[scored] = k
        positions = np.arange(len(names))
    else:
        positions = np.flatnonzero(~in_bank)
        if len(positions) == 0:
            return None
        refs = [{str(s): ray.put(b.to_bytes()) for s, b in det.banks.items()}]
    scored = [names[p] for p in positions]
    summaries = map_with_detector(
        decoded_units(scored, cfg, pool),  # read and decoded by CPU tasks, as scoring's
        FoldScorer,
        bundle,
        cfg,
        pool,
        n_items=-(-len(scored) // cfg.score.batch_size),
        batch_size=1,  # one decoded unit per call
        batch_format="pyarrow",
        fold_banks=refs,
        folds=ray.put({names[p]: int(fold_of[p]) for p in positions}),
    ).materialize()  # in the object store (spilled to disk if need be), not on the driver

    def read(prefix: str) -> Iterator[tuple[dict[int, np.ndarray], np.ndarray]]:
        """(per scale the column of the read images, errors) per batch of summaries."""
        columns = [f"{prefix}_{s}" for s in det.scales]
        for b in summaries.select_columns(["error", *columns]).iter_batches(
            batch_size=64, batch_format="numpy"
        ):
            good = np.array([not e for e in b["error"]], bool)
            yield {s: b[f"{prefix}_{s}"][good] for s in det.scales}, b["error"][~good]

    moments = {s: np.zeros(3) for s in det.scales}
    errors: list[str] = []
    for b, bad in read("moments"):
        errors.extend(str(e) for e in bad)
        for s in det.scales:
            moments[s] += b[s].sum(0)
    if errors:
        log.warning("calibration: %d unreadable images skipped, e.g. %s", len(errors), errors[0])
    grid = window_grid(det.cfg)

    def scores_for(stats: dict[int, tuple[float, float]]) -> np.ndarray:
        return np.concatenate(
            [
                summary_scores(
                    det, {s: torch.from_numpy(v).view(-1, *grid) for s, v in b.items()}, stats
                ).numpy()
                for b, _ in read("pooled")
            ]
        )

    mode = "crossfit" if plan is not None else "bank" if source == "bank" else "holdout"
    cal = calibrate_from_summary(det, moments, scores_for, mode)
    cal = widen_for_suspects(det, cal, info)  # near-duplicates beyond the content sample
    det.meta["calibration"].update(info)
    return cal
