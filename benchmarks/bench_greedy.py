"""Greedy k-center coreset build: plain loop vs triangle-inequality pruning (vs projection).

Times :func:`mspray.bank.greedy_coreset` side by side in one run (round-robin, median of
``--repeats``) on two kinds of candidates: real patch embeddings (mspray's random-init
encoder of ``--scale`` on synthetic 256 px texture images) and isotropic Gaussian vectors
(``bench_bank.py``'s data, no structure: the worst case for pruning). Quality is the
coverage radius (largest distance of any candidate to its nearest pick, in the original
space); pruned picks must equal the plain ones.

    nice python benchmarks/bench_greedy.py [--images 8] [--ratio 0.1] [--scale 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from mspray.bank import greedy_coreset
from mspray.config import MSPrayConfig
from mspray.data.datasets import train_paths
from mspray.data.images import load_images
from mspray.data.synthetic import make_synthetic_dataset
from mspray.detector import Detector
from mspray.model.multiscale import MultiScaleEncoder

VARIANTS = {
    "plain": {"prune": False},
    "pruned": {"prune": True},
    "proj32 + pruned": {"prune": True, "proj_dim": 32},
}


def radius(x: torch.Tensor, idx: torch.Tensor) -> float:
    """Coverage radius of the picks ``idx`` over all rows of ``x``."""
    return max(
        torch.cdist(x[s : s + 4096], x[idx]).min(1).values.max().item()
        for s in range(0, x.shape[0], 4096)
    )


def embeddings(n_images: int, scale: int) -> torch.Tensor:
    root = tempfile.mkdtemp(prefix="mspray-greedy-")
    make_synthetic_dataset(root, "s", n_train=n_images, n_test_good=1, n_test_defect=1, seed=1)
    cfg = MSPrayConfig().replace(**{"model.pretrained": False})
    torch.manual_seed(0)
    det = Detector(cfg, MultiScaleEncoder(cfg))
    imgs = load_images(train_paths(f"mvtec:{root}", "s"), 256, progress=False)
    return torch.cat(
        [
            torch.from_numpy(det.bank_embeddings(imgs[i : i + 2], scale))
            for i in range(0, n_images, 2)
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--scale", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    real = embeddings(args.images, args.scale)
    gauss = torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    print(f"threads {torch.get_num_threads()}, ratio {args.ratio}")
    head = f"{'data':<24} {'variant':<16} {'N':>7} {'picks':>6} {'build s':>8} {'x plain':>7}"
    head += f" {'radius':>8}"
    print(head + "\n" + "-" * len(head))
    for name, x in ((f"embeddings scale {args.scale}", real), ("gaussian", gauss)):
        k = int(np.ceil(args.ratio * x.shape[0]))
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        picks = {}
        for _ in range(args.repeats):
            for v, kw in VARIANTS.items():
                t0 = time.perf_counter()
                picks[v] = greedy_coreset(x, k, seed=0, **kw)
                times[v].append(time.perf_counter() - t0)
        base = statistics.median(times["plain"])
        for v in VARIANTS:
            t = statistics.median(times[v])
            print(
                f"{name:<24} {v:<16} {x.shape[0]:>7} {k:>6} {t:>8.2f} {base / t:>7.2f} "
                f"{radius(x, picks[v]):>8.4f}"
            )
        print(f"{name}: pruned picks equal plain: {torch.equal(picks['plain'], picks['pruned'])}")


if __name__ == "__main__":
    main()
