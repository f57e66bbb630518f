"""Cross-calibration's fold banks: a fresh greedy coreset per fold and scale (before) against
fold banks derived from one shared greedy run per scale (:mod:`mspray.decisions.fold_banks`, after).

Synthetic patch embeddings of overlapping "tiles" (rows of one smooth random field, so
neighbouring images share content). Prints, per method, the seconds spent on the fold banks
and how close each fold's scored images come to their fold bank (mean nearest distance: the
derived banks must cover as a fresh coreset does, or the promise would move).

    python benchmarks/bench_fold_banks.py --images 180 --patches 169 --dim 64
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch

from mspray.bank import PatchBank
from mspray.config import MSPrayConfig
from mspray.decisions.calibration import fold_plan
from mspray.decisions.fold_banks import fold_banks


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

    def fresh():  # before: a coreset per fold and scale
        for scored, excluded in plan:
            yield (
                scored,
                {
                    s: PatchBank.build(x[~np.isin(o, excluded)], cfg.bank, seed=0)
                    for s, (x, o) in emb.items()
                },
            )

    out = {}
    for name, make in (("fresh", fresh), ("derived", lambda: fold_banks(det, plan, in_bank, emb))):
        built, dist, it = 0.0, [], make()
        while True:
            t0 = time.process_time()
            item = next(it, None)
            built += time.process_time() - t0  # CPU time (one thread): robust to a loaded machine
            if item is None:
                break
            scored, banks = item
            q = np.isin(owner, scored)
            dist.append(float(np.mean([banks[s].search(rows[s][q]).mean() for s in rows])))
        out[name] = (built, float(np.mean(dist)))
    (tf, df), (td, dd) = out["fresh"], out["derived"]
    print(
        f"{n} images x {p} rows x {d} dims, {args.scales} scales, 5 folds, coreset "
        f"{args.coreset}: fresh {tf:.1f} CPU s, derived {td:.1f} CPU s ({tf / td:.1f}x faster); "
        f"fold images' mean distance to their fold bank: fresh {df:.4f}, derived {dd:.4f} "
        f"({dd / df:.3f}x)"
    )


if __name__ == "__main__":
    main()
