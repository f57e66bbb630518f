"""Cross-calibration's fold banks: a fresh greedy coreset per fold and scale, the former
derived banks (half of the shared greedy run's picks, then a greedy continuation over all
of a fold's rows to its target size) and today's (every usable pick of the shared run, then
a greedy continuation over the orphans only: :mod:`mspray.decisions.fold_banks`).

Synthetic patch embeddings of overlapping "tiles" (rows of one smooth random field, so
neighbouring images share content). Prints, per method, the CPU seconds spent on the fold
banks (one thread, so a loaded machine changes them little), the fold banks' size, and how
close each fold's scored images come to their fold bank (mean nearest distance: the derived
banks must cover as a fresh coreset does, or the promise would move), with the ratios of
the former and the fresh method's seconds to today's measured in the same run.

    python benchmarks/bench_fold_banks.py --images 180 --patches 169 --dim 64
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from types import SimpleNamespace

import numpy as np
import torch

from mspray.bank import PatchBank
from mspray.bank.coreset import greedy_coreset
from mspray.config import MSPrayConfig
from mspray.decisions.calibration import fold_plan
from mspray.decisions.fold_banks import fold_banks


def former_fold_banks(cfg, plan, emb):
    """The fold banks of the previous revision: the first half of the shared run's usable
    picks, topped up by a greedy continuation over all of the fold's rows."""
    full = {}
    for s, (x, _) in emb.items():
        n_pick = math.ceil(cfg.bank.coreset_ratio * len(x))
        full[s] = greedy_coreset(torch.from_numpy(x), n_pick, seed=0).numpy()
    for scored, excluded in plan:
        banks = {}
        for s, (x, owner) in emb.items():
            keep = ~np.isin(owner, excluded)
            target = math.ceil(cfg.bank.coreset_ratio * keep.sum())
            kept = full[s][keep[full[s]]][: math.ceil(0.5 * target)]
            rest = np.setdiff1d(np.flatnonzero(keep), kept)
            init = torch.cdist(torch.from_numpy(x[rest]), torch.from_numpy(x[kept]))
            more = greedy_coreset(torch.from_numpy(x[rest]), target - len(kept), seed=0,
                                  init_dist=init.amin(1).square())  # fmt: skip
            rows = np.concatenate([kept, rest[more.numpy()]])
            banks[s] = PatchBank.build(x[rows], cfg.bank.replace(coreset_ratio=1.0))
        yield scored, banks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=180)
    ap.add_argument("--patches", type=int, default=169, help="bank rows per image per scale")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--scales", type=int, default=3)
    ap.add_argument("--coreset", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n, p, d = args.images, args.patches, args.dim
    field = torch.nn.functional.avg_pool1d(torch.randn(1, d, n * p // 4 + p), 9, 1)[0].T
    start = torch.arange(n) * (p // 4)  # each image shares 3/4 of its rows with the next
    rows = {s: (field[start[:, None] + torch.arange(p)] + 0.05 * torch.randn(n, p, d, generator=g))
            .reshape(n * p, d).numpy() for s in range(args.scales)}  # fmt: skip
    owner = np.repeat(np.arange(n), p)
    emb = {s: (rows[s], owner) for s in rows}
    cfg = MSPrayConfig().replace(**{"bank.coreset_ratio": args.coreset})
    det = SimpleNamespace(cfg=cfg, scales=tuple(rows))
    in_bank = np.ones(n, bool)
    plan = fold_plan(n, 5, gap=4)

    def fresh():  # a coreset per fold and scale
        for scored, excluded in plan:
            yield (
                scored,
                {
                    s: PatchBank.build(x[~np.isin(o, excluded)], cfg.bank, seed=0)
                    for s, (x, o) in emb.items()
                },
            )

    methods = {
        "fresh": fresh,
        "former": lambda: former_fold_banks(cfg, plan, emb),
        "derived": lambda: fold_banks(det, plan, in_bank, emb),
    }
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
        f"fp32; {n} images x {p} rows x {d} dims, {args.scales} scales, 5 folds (gap 4), "
        f"coreset {args.coreset}"
    )
    print("| fold banks | CPU s | rows per fold bank | fold images' mean distance to it |")
    print("|---|---|---|---|")
    out = {}
    for name, make in methods.items():
        built, dist, size, it = 0.0, [], [], make()
        while True:
            t0 = time.process_time()
            item = next(it, None)
            built += time.process_time() - t0
            if item is None:
                break
            scored, banks = item
            q = np.isin(owner, scored)
            dist.append(float(np.mean([banks[s].search(rows[s][q]).mean() for s in rows])))
            size.append(np.mean([b.ntotal for b in banks.values()]))
        out[name] = built
        print(f"| {name} | {built:.1f} | {np.mean(size):.0f} | {np.mean(dist):.4f} |", flush=True)
    print(
        f"derived vs former: {out['former'] / out['derived']:.1f}x faster; "
        f"vs fresh: {out['fresh'] / out['derived']:.1f}x faster"
    )


if __name__ == "__main__":
    main()
