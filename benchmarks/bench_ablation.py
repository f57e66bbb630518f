"""Ablation on synthetic data: scales (64 / 64+32 / 64+32+16) and each loss removed in turn.

Every run trains from the same init (random here: no ImageNet weights can be downloaded)
on the same synthetic dataset and is evaluated on the same test split. Prints image AUROC,
pixel AUROC and AUPRO per run.

    python benchmarks/bench_ablation.py [--image-size 128] [--epochs 3] [--only full,no_ssl]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from mspray.config import MSPrayConfig
from mspray.data.datasets import test_samples, train_paths
from mspray.data.synthetic import make_synthetic_dataset
from mspray.demo import demo_config
from mspray.evaluate import evaluate
from mspray.fit import fit_detector

ALL = ("svdd", "cos", "ssl", "kmeans")
RUNS: dict[str, dict] = {
    "scale 64": {"model.scales": (64,), "model.strides": (16,)},
    "scales 64+32": {"model.scales": (64, 32), "model.strides": (16, 4)},
    "scales 64+32+16 (full)": {},
    **{f"full w/o {loss}": {"train.losses": tuple(x for x in ALL if x != loss)} for loss in ALL},
    "full, untrained encoders": {"train.epochs": 0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=24)
    ap.add_argument("--kind", default="texture", choices=["texture", "object"])
    ap.add_argument("--only", help="comma-separated substrings of run names to keep")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    base = demo_config(args.epochs).replace(**{"model.image_size": args.image_size})
    root = tempfile.mkdtemp(prefix="mspray-ablation-")
    make_synthetic_dataset(
        root,
        "synthetic",
        n_train=args.n_train,
        n_test_good=12,
        n_test_defect=24,
        size=args.image_size,
        seed=1,
        kind=args.kind,
    )
    spec = f"mvtec:{root}"
    uris, samples = train_paths(spec, "synthetic"), test_samples(spec, "synthetic")
    results = {}
    for name, over in RUNS.items():
        if args.only and not any(k in name for k in args.only.split(",")):
            continue
        cfg = MSPrayConfig.from_dict(base.to_dict()).replace(**over) if over else base
        t0 = time.perf_counter()
        det = fit_detector(cfg, uris, progress=False)
        m = evaluate(det, samples, progress=False)
        m["train_eval_seconds"] = time.perf_counter() - t0
        results[name] = m
        print(
            f"done {name}: {m['image_auroc']:.3f} {m['pixel_auroc']:.3f} "
            f"({m['train_eval_seconds']:.0f}s)",
            flush=True,
        )
    print(
        f"\nsynthetic {args.kind}, {args.image_size}px, {len(uris)} train / {len(samples)} "
        f"test images, {args.epochs} epochs, random init"
    )
    head = f"{'run':<28} {'image AUROC':>11} {'pixel AUROC':>11} {'AUPRO':>7} {'seconds':>8}"
    print(head + "\n" + "-" * len(head))
    for name, m in results.items():
        print(
            f"{name:<28} {m['image_auroc']:>11.3f} {m['pixel_auroc']:>11.3f} "
            f"{m['pixel_aupro']:>7.3f} {m['train_eval_seconds']:>8.0f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
