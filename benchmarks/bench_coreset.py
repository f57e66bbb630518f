"""Coreset bank vs full bank: search speed-up and image/pixel AUROC of the same model.

One detector is trained on synthetic data; its banks are then built from the same training
embeddings with every patch kept (exact) and with a greedy coreset; both are evaluated on
the same test split, and bank search alone is timed side by side.

    python benchmarks/bench_coreset.py [--ratio 0.1] [--image-size 256] [--epochs 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch

from mspray.cli.demo import demo_config
from mspray.config.run import use_run
from mspray.data.datasets import test_samples, train_paths
from mspray.data.images import load_images
from mspray.data.synthetic import make_synthetic_dataset
from mspray.evaluation.evaluate import evaluate
from mspray.pipeline.steps import fit_detector, split_holdout


def search_seconds(det, images: torch.Tensor, repeats: int = 3) -> float:
    """Median time of the bank searches alone for ``images`` (embeddings precomputed)."""
    grids = {s: det.model.embed(images, s) for s in det.scales}
    queries = {s: g.reshape(-1, g.shape[-1]).numpy() for s, g in grids.items()}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in det.scales:
            det.banks[s].search(queries[s])
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--n-train", type=int, default=24)
    args = ap.parse_args()
    cfg = demo_config(args.epochs).replace(
        **{"model.image_size": args.image_size, "bank.coreset_ratio": 1.0}
    )
    root = tempfile.mkdtemp(prefix="mspray-coreset-")
    make_synthetic_dataset(
        root,
        "synthetic",
        n_train=args.n_train,
        n_test_good=12,
        n_test_defect=24,
        size=args.image_size,
        seed=2,
    )
    spec = f"mvtec:{root}"
    uris, samples = train_paths(spec, "synthetic"), test_samples(spec, "synthetic")
    det = fit_detector(cfg, uris)
    train_uris, _ = split_holdout(uris, cfg.train.val_fraction, cfg.train.seed)
    train = load_images(train_uris, args.image_size)
    test = load_images([s.path for s in samples[:8]], args.image_size)
    rows = []
    for name, ratio in (("full bank", 1.0), (f"coreset {args.ratio:g}", args.ratio)):
        det.cfg = dataclasses.replace(
            det.cfg, bank=dataclasses.replace(det.cfg.bank, coreset_ratio=ratio)
        )
        t0 = time.perf_counter()
        det.build_banks(train)
        build = time.perf_counter() - t0
        m = evaluate(det, samples)
        sizes = "/".join(str(det.banks[s].ntotal) for s in det.scales)
        rows.append((name, sizes, build, search_seconds(det, test), m))
    print(
        f"synthetic {args.image_size}px, {len(train_uris)} bank images, "
        f"{len(samples)} test images, threads {torch.get_num_threads()}"
    )
    head = (
        f"{'bank':<14} {'sizes 64/32/16':>22} {'build s':>8} {'search s':>9} "
        f"{'speed-up':>8} {'image AUROC':>11} {'pixel AUROC':>11}"
    )
    print(head + "\n" + "-" * len(head))
    base = rows[0][3]
    for name, sizes, build, search, m in rows:
        print(
            f"{name:<14} {sizes:>22} {build:>8.1f} {search:>9.3f} {base / search:>8.1f} "
            f"{m['image_auroc']:>11.4f} {m['pixel_auroc']:>11.4f}"
        )
    d = 100 * (rows[1][4]["image_auroc"] - rows[0][4]["image_auroc"])
    print(f"image AUROC change: {d:+.2f} pt (target within 0.5 pt)")


if __name__ == "__main__":
    with use_run(progress=False):  # figures, not bars
        main()
