"""Greedy k-center coreset build: plain loop vs per-point pruning (old) vs cell pruning (new).

Times :func:`mspray.bank.coreset.greedy_coreset` side by side in one run (round-robin, median of
``--repeats``): ``plain`` (``prune=False``, one full N×D pass per pick), ``old pruned``
(the previous default, per-point Elkan-style pruning, kept here as :func:`old_pruned` for
comparison) and ``cells`` (the default, cell pruning). Candidates:

* real patch embeddings: mspray's random-init encoder of ``--scale`` on ``--images``
  synthetic 256 px texture images (3721 patches each at scale 16), and the bank-building
  target, ``--big-images`` images capped to ``--big-candidates`` random rows (200k, the
  default ``coreset_max_candidates``; 10 % of them is the default ``coreset_max_size``);
* isotropic Gaussian vectors of the same shapes (``bench_bank.py``'s data, no structure:
  the worst case for any pruning).

Quality is the coverage radius (largest distance of any candidate to its nearest pick, in
the original space). "= plain" compares the pick sequence with the plain loop's: ``yes``
(identical), or the first pick where it differs and whether that is a float tie (both
points equally far from the common earlier picks in float64, to 1e-4 relative).

    nice python benchmarks/bench_greedy.py [--images 6] [--big-images 54] [--big-old]
        [--repeats 3] [--big-repeats 1] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import faiss
import numpy as np
import torch

from mspray.bank.coreset import greedy_coreset
from mspray.config import MSPrayConfig
from mspray.config.run import use_run
from mspray.data.datasets import train_paths
from mspray.data.images import load_images
from mspray.data.synthetic import make_synthetic_dataset
from mspray.detector import Detector
from mspray.model.multiscale import MultiScaleEncoder

Picker = Callable[[torch.Tensor, int], torch.Tensor]


def old_pruned(x: torch.Tensor, n_select: int, seed: int = 0) -> torch.Tensor:
    """The previous default (per-point triangle-inequality pruning), as it was in bank.py.

    Every point remembers its nearest center ``a``; a new center ``c`` can only bring ``x``
    closer when ``d(c, a) < 2·d(x, a)``; each pick measures c against all centers so far
    and the points that pass, or all points densely when more than 25 % pass.
    """
    n, d = x.shape
    gen = torch.Generator().manual_seed(seed)  # the same start point as greedy_coreset
    work = x.float().contiguous().clone()
    sq_norms_t = work.square().sum(1)
    best_t = torch.full((n,), float("inf"))
    cur_i = int(torch.randint(n, (), generator=gen))
    xn, norms, best = work.numpy(), sq_norms_t.numpy(), best_t.numpy()
    selected = np.empty(n_select, dtype=np.int64)
    centers = np.empty((n_select, d), dtype=np.float32)
    center_sq = np.empty(n_select, dtype=np.float32)
    to_new = np.full(n_select + 1, -np.inf, dtype=np.float32)
    nearest = np.full(n, n_select, dtype=np.int64)
    nearest_t, dist_t = torch.from_numpy(nearest), torch.empty(n)
    frac = 0.0
    for i in range(n_select):
        selected[i] = cur_i
        c, c_sq = xn[cur_i], norms[cur_i]
        centers[i], center_sq[i] = c, c_sq
        if i:
            to_new[:i] = center_sq[:i] - 2.0 * (centers[:i] @ c) + c_sq
        if frac > 0.25 and i % 32:
            torch.addmv(sq_norms_t, work, torch.from_numpy(c), alpha=-2.0, out=dist_t)
            dist_t += float(c_sq)
            nearest_t.masked_fill_(dist_t < best_t, i)
            torch.minimum(best_t, dist_t, out=best_t)
        else:
            cand = np.flatnonzero(to_new[nearest] < 4.0 * (1.0 + 1e-3) * best)
            frac = cand.size / n
            if cand.size:
                dist = norms[cand] - 2.0 * (xn[cand] @ c) + c_sq
                closer = dist < best[cand]
                best[cand[closer]] = dist[closer]
                nearest[cand[closer]] = i
        best[cur_i] = -np.inf
        cur_i = int(np.argmax(best))
    return torch.from_numpy(selected)


VARIANTS: dict[str, Picker] = {
    "plain": lambda x, k: greedy_coreset(x, k, seed=0, prune=False),
    "old pruned": lambda x, k: old_pruned(x, k, seed=0),
    "cells (default)": lambda x, k: greedy_coreset(x, k, seed=0),
}


def radius(x: torch.Tensor, idx: torch.Tensor) -> float:
    """Coverage radius of the picks ``idx`` over all rows of ``x`` (exact faiss search)."""
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x[idx].numpy())
    sq, _ = index.search(x.numpy(), 1)
    return float(np.sqrt(max(float(sq.max()), 0.0)))


def same_as(x: torch.Tensor, ref: torch.Tensor, got: torch.Tensor) -> str:
    """``yes`` if ``got`` is ``ref``'s pick sequence, else where and how it first differs."""
    diff = (ref != got).nonzero()
    if not len(diff):
        return "yes"
    i = int(diff[0])
    x64 = x.double()
    if i == 0:
        return "no (start)"
    prefix = x64[ref[:i]]
    a, b = (torch.cdist(x64[t[i]].view(1, -1), prefix).min().item() for t in (ref, got))
    gap = (a - b) / a
    kind = "float tie" if abs(gap) < 1e-4 else "NOT a tie"
    return f"from pick {i}: {kind} ({gap:+.0e})"


def embeddings(n_images: int, scale: int) -> torch.Tensor:
    root = tempfile.mkdtemp(prefix="mspray-greedy-")
    make_synthetic_dataset(root, "s", n_train=n_images, n_test_good=1, n_test_defect=1, seed=1)
    cfg = MSPrayConfig().replace(**{"model.pretrained": False})
    torch.manual_seed(0)
    det = Detector(cfg, MultiScaleEncoder(cfg))
    imgs = load_images(train_paths(f"mvtec:{root}", "s"), 256)
    return torch.cat(
        [
            torch.from_numpy(det.bank_embeddings(imgs[i : i + 2], scale))
            for i in range(0, n_images, 2)
        ]
    )


def cap(x: torch.Tensor, n: int) -> torch.Tensor:
    """At most ``n`` random rows of ``x`` (in order), as PatchBank's candidate cap does."""
    if x.shape[0] <= n:
        return x
    keep = np.sort(np.random.default_rng(0).choice(x.shape[0], size=n, replace=False))
    return x[torch.from_numpy(keep)]


def bench(name: str, x: torch.Tensor, ratio: float, repeats: int, variants: list[str]) -> None:
    k = int(np.ceil(ratio * x.shape[0]))
    times: dict[str, list[float]] = {v: [] for v in variants}
    picks: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for v in variants:
            t0 = time.perf_counter()
            picks[v] = VARIANTS[v](x, k)
            times[v].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    radii: dict[frozenset[int], float] = {}  # the same set of picks has the same radius
    for v in variants:
        t = statistics.median(times[v])
        key = frozenset(picks[v].tolist())
        if key not in radii:
            radii[key] = radius(x, picks[v])
        same = same_as(x, picks["plain"], picks[v])
        print(
            f"| {name} | {v} | {x.shape[0]} → {k} | {t:.2f} | {base / t:.2f} "
            f"| {radii[key]:.4f} | {same} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=6, help="images of the small case")
    ap.add_argument("--big-images", type=int, default=54, help="images of the 200k case (0: skip)")
    ap.add_argument("--big-candidates", type=int, default=200_000)
    ap.add_argument("--scale", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big-repeats", type=int, default=1, help="repeats of the 200k cases")
    ap.add_argument("--threads", type=int, default=0, help="torch/faiss threads (0 = default)")
    ap.add_argument("--no-gaussian", action="store_true", help="skip the Gaussian rows")
    ap.add_argument("--no-big-gaussian", action="store_true", help="skip the 200k Gaussian")
    ap.add_argument(
        "--big-old",
        action="store_true",
        help="also time 'old pruned' on the 200k embeddings (never on the 200k Gaussian, "
        "where it took 894 s, 0.06x plain, in one run)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(torch.get_num_threads())
    gen = torch.Generator().manual_seed(0)
    emb = f"embeddings scale {args.scale}"
    small = embeddings(args.images, args.scale)
    cases = [(emb, small, True, args.repeats)]
    if args.big_images:
        big = cap(embeddings(args.big_images, args.scale), args.big_candidates)
        cases.append((emb, big, args.big_old, args.big_repeats))
    if not args.no_gaussian:
        gauss = "isotropic Gaussian, D = 64"
        cases.append((gauss, torch.randn(small.shape, generator=gen), True, args.repeats))
        if args.big_images and not args.no_big_gaussian:
            cases.append((gauss, torch.randn(big.shape, generator=gen), False, args.big_repeats))
    print(f"threads {torch.get_num_threads()}, ratio {args.ratio}, repeats {args.repeats}", end="")
    print(f" ({args.big_repeats} for 200k), median wall time\n")
    print("| candidates | variant | N → picks | build s | × plain | coverage radius | = plain |")
    print("|---|---|---|---|---|---|---|")
    for name, x, old, repeats in cases:
        variants = [v for v in VARIANTS if old or v != "old pruned"]
        bench(name, x, args.ratio, repeats, variants)


if __name__ == "__main__":
    with use_run(progress=False):  # figures, not bars
        main()
