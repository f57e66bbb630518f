"""The banks of cross-calibration's folds, derived from the full bank's coreset.

A fold's bank holds the bank images outside the fold's excluded set. Building each one as a
fresh greedy coreset costs a coreset per scale per fold (15 beside the bank's own 3 at the
default 5 folds and 3 scales). Here one greedy run per scale over the full candidate set is
shared; it also records every candidate row's nearest pick. A fold keeps the first picks of
that run whose images it may use, in pick order, and tops them up with a greedy
continuation (farthest from the kept picks) to its own target size. The kept picks were the
farthest points of the whole set when picked, so the fold bank covers its images as densely
as the full bank covers all of them: a fold image is as new to its fold bank as a new day's
image is to the real bank.

The continuation picks among a bounded candidate set, not among all the fold's rows: the
shared run's other usable picks and the fold's *orphans*, the rows whose nearest pick lay in
an excluded image. Every other row of the fold lies within the shared run's covering radius
of one of its usable picks, so these candidates stand for all of them, and a fold costs a
greedy run over about a tenth of its rows (at ``coreset_ratio`` 0.1) instead of all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mspray.bank import PatchBank
from mspray.bank.coreset import greedy_coreset
from mspray.config import BankConfig

if TYPE_CHECKING:
    from mspray.detector import Detector

#: The share of a fold bank taken from the shared greedy run's first usable picks (the rest:
#: the fold's own greedy continuation); measured in ``benchmarks/bench_fold_banks.py``.
KEEP = 0.5

#: (scale, images in the fold bank, embedding rows given) -> bank config of a fold bank
FoldBankConfig = Callable[[int, int, int], BankConfig]


@dataclass
class SharedRun:
    """One greedy run over a scale's candidate rows: the picks (indices into the rows, in
    pick order) and each candidate's nearest pick (a position in ``picks``)."""

    candidates: np.ndarray
    picks: np.ndarray
    nearest: np.ndarray


def _candidates(n: int, cfg: BankConfig, seed: int) -> np.ndarray:
    """The rows a coreset of ``n`` rows picks among (as :class:`PatchBank` does)."""
    if n <= cfg.coreset_max_candidates:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=cfg.coreset_max_candidates, replace=False))


def _target(cfg: BankConfig, rows: int, available: int) -> int:
    return min(math.ceil(cfg.coreset_ratio * rows), cfg.coreset_max_size, available)


def shared_run(x: np.ndarray, cfg: BankConfig, seed: int) -> SharedRun:
    """The greedy coreset of ``x`` (the picks :meth:`PatchBank.build` makes) and the nearest
    pick of every candidate row."""
    cand = _candidates(len(x), cfg, seed)
    cover: dict[str, torch.Tensor] = {}
    xt = torch.from_numpy(np.ascontiguousarray(x[cand], dtype=np.float32))
    picks = greedy_coreset(xt, _target(cfg, len(x), len(cand)), seed=seed, cover=cover)
    return SharedRun(cand, cand[picks.numpy()], cover["nearest"].numpy())


def fold_rows(
    x: np.ndarray, keep: np.ndarray, cfg: BankConfig, seed: int, full: SharedRun | None
) -> np.ndarray:
    """Rows of ``x`` (indices) in the fold bank of the rows ``keep`` (bools): all of them
    without a coreset; else the first of ``full``'s picks that the fold may use, topped up
    greedily to the fold's target size from its other usable picks and its orphans."""
    if cfg.coreset_ratio >= 1.0 or full is None:
        return np.flatnonzero(keep)
    fold_cand = full.candidates[keep[full.candidates]]
    target = _target(cfg, int(keep.sum()), len(fold_cand))
    usable = keep[full.picks]
    picks = full.picks[usable]
    # the shared run's first picks, then a greedy continuation fills the holes that the
    # excluded images' picks leave (keeping all of them would cover the fold more thinly)
    kept = picks[: math.ceil(KEEP * target)]
    if len(kept) >= target:
        return np.sort(kept)
    orphans = full.candidates[keep[full.candidates] & ~usable[full.nearest]]
    rest = np.concatenate([picks[len(kept) :], orphans])
    if len(rest) < target - len(kept):  # too few (a ratio near 1): all the fold's rows
        rest = np.setdiff1d(fold_cand, kept)
    xt = torch.from_numpy(np.ascontiguousarray(x[rest], dtype=np.float32))
    init = None
    if len(kept):
        picked = torch.from_numpy(np.ascontiguousarray(x[kept], dtype=np.float32))
        mean = picked.mean(0)  # centred, as the greedy loop measures (no cancellation)
        init = torch.cdist(xt - mean, picked - mean).amin(1).square()
    more = greedy_coreset(xt, target - len(kept), seed=seed, init_dist=init)
    return np.sort(np.concatenate([kept, rest[more.numpy()]]))


def fold_banks(
    det: Detector,
    plan: list[tuple[np.ndarray, np.ndarray]],
    in_bank: np.ndarray,
    embeddings: dict[int, tuple[np.ndarray, np.ndarray]],
    bank_config: FoldBankConfig | None = None,
    timings: dict[str, float] | None = None,
) -> Iterator[tuple[np.ndarray, dict[int, PatchBank]]]:
    """For each fold of ``plan``: the images it scores and its banks (every scale), built
    from the ``embeddings`` (per scale: rows, image index of each row) of the bank images
    outside the fold's excluded range, with the detector's bank config (or
    ``bank_config(scale, images in the fold bank, rows given)``). One fold at a time; one
    greedy coreset per scale is shared by the folds (module docstring). ``timings`` gets
    the seconds spent on the shared coresets and on the folds' own banks."""
    seed = det.cfg.train.seed
    t = timings if timings is not None else {}
    full: dict[int, SharedRun | None] = {}
    t0 = time.perf_counter()
    for scale in det.scales:
        emb, _ = embeddings[scale]
        cfg = bank_config(scale, int(in_bank.sum()), len(emb)) if bank_config else det.cfg.bank
        full[scale] = shared_run(emb, cfg, seed) if cfg.coreset_ratio < 1.0 else None
    t["fold_coreset_shared_s"] = t.get("fold_coreset_shared_s", 0.0) + time.perf_counter() - t0
    for scored, excluded in plan:
        t0 = time.perf_counter()
        n_imgs = int(np.delete(in_bank, excluded).sum())
        banks = {}
        for scale in det.scales:
            emb, owner = embeddings[scale]
            keep = ~np.isin(owner, excluded)
            n_rows = int(keep.sum())
            cfg = bank_config(scale, n_imgs, n_rows) if bank_config else det.cfg.bank
            rows = fold_rows(emb, keep, cfg, seed, full[scale])
            banks[scale] = PatchBank.build(emb[rows], cfg.replace(coreset_ratio=1.0), seed=seed)
        t["fold_banks_s"] = t.get("fold_banks_s", 0.0) + time.perf_counter() - t0
        yield scored, banks
