"""What synthetic-anomaly selection adds to a scale's training, against the former selection.

Per scale, at the no-ImageNet default settings (``--image-size`` px, 100 samples per image,
batch 64, 20 epochs) on ``--n-images`` synthetic texture images (10 % held out):

- ``train s/epoch``: one training epoch, extrapolated from ``--steps`` timed optimiser
  steps (every step of an epoch does the same work) plus one K-means center update;
- ``set s``: making the selection set (once per fit, shared by the scales);
- ``select s``: one selection candidate (:func:`mspray.train.selection.scale_maps` and its
  metrics, cache cleared), and the same for the former selection (dense grids of 32 whole
  bank images and 32 + 128 whole query images at inference stride, a random 20 000-row
  bank, ``torch.cdist``), kept here as :func:`former_selection`;
- ``added``: selection's share of the scale's training time over ``--epochs`` epochs:
  (set + candidates × select) / (epochs × train), the candidates being epoch 0, every
  ``train.select_every``-th epoch and the last (6 of 21 at the defaults; ``--every 1``: all).
  The fused check costs nothing more in one process (its candidates are cached); the
  former one ran every scale twice more.

    nice python benchmarks/bench_selection.py --image-size 256 --n-images 40
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mspray import maps as M  # noqa: E402
from mspray.config import MSPrayConfig  # noqa: E402
from mspray.config.run import use_run  # noqa: E402
from mspray.data.anomalies import paste_anomalies  # noqa: E402
from mspray.data.datasets import train_paths  # noqa: E402
from mspray.data.images import load_images  # noqa: E402
from mspray.data.synthetic import make_synthetic_dataset  # noqa: E402
from mspray.model.multiscale import build_scale_model, normalize  # noqa: E402
from mspray.pipeline.steps import split_holdout  # noqa: E402
from mspray.train import selection  # noqa: E402
from mspray.train.loop import ScaleTrainer  # noqa: E402
from mspray.train.recipes import no_imagenet_defaults  # noqa: E402

DEFAULT_STRIDE = {64: 16, 32: 4, 16: 4}


@torch.no_grad()
def former_selection(enc, cfg: MSPrayConfig, train: torch.Tensor, val: torch.Tensor) -> float:
    """The selection of the previous revision (one candidate): seconds, dense whole images."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(train.shape[0], generator=g)
    n_extra = min(max(0, 32 - val.shape[0]), train.shape[0] // 2)
    bank_imgs = train[order[: min(train.shape[0] - n_extra, 32)]]
    clean = torch.cat([val, train[order[train.shape[0] - n_extra :]]])
    anomalous, _ = paste_anomalies(clean, 4, 0)
    stride = cfg.stride_for(enc.patch_size)
    step = stride // enc.stride

    def grid(x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [enc(normalize(x[i : i + 8]))[:, :, ::step, ::step].permute(0, 2, 3, 1)
             for i in range(0, len(x), 8)]
        )  # fmt: skip

    enc.eval()
    bank = grid(bank_imgs).flatten(0, 2)
    if bank.shape[0] > 20_000:
        bank = bank[torch.randperm(bank.shape[0], generator=g)[:20_000]]
    q = grid(torch.cat([clean, anomalous]))
    b, h, w, d = q.shape
    q = q.reshape(-1, d)
    dist = torch.cat([torch.cdist(q[i : i + 4096], bank).amin(1) for i in range(0, len(q), 4096)])
    M.patch_scores_to_map(dist.view(b, h, w), enc.patch_size, stride, tuple(clean.shape[-2:]))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--n-images", type=int, default=40)
    ap.add_argument("--scales", default="64,32,16")
    ap.add_argument("--steps", type=int, default=4, help="timed optimiser steps per scale")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--no-former", action="store_true", help="skip the former selection")
    ap.add_argument("--every", type=int, default=None, help="train.select_every (default: its)")
    args = ap.parse_args()
    scales = tuple(int(s) for s in args.scales.split(","))
    cfg = MSPrayConfig().replace(
        **{
            "model.image_size": args.image_size,
            "model.scales": scales,
            "model.strides": tuple(DEFAULT_STRIDE[s] for s in scales),
            "model.pretrained": False,
            "train.epochs": args.epochs,
        }
    )
    if args.every:
        cfg = cfg.replace(**{"train.select_every": args.every})
    cfg = no_imagenet_defaults(cfg, False)
    root = tempfile.mkdtemp(prefix="mspray-bench-selection-")
    make_synthetic_dataset(
        root, "synthetic", n_train=args.n_images, n_test_good=1, n_test_defect=1,
        size=args.image_size, seed=1, kind="texture",
    )  # fmt: skip
    uris = train_paths(f"mvtec:{root}", "synthetic")
    tr_uris, val_uris = split_holdout(uris, cfg.train.val_fraction, cfg.train.seed)
    train = load_images(tr_uris, args.image_size)
    val = load_images(val_uris, args.image_size)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32; {len(tr_uris)} train + {len(val_uris)} "
        f"held-out images, {args.image_size}px, {cfg.train.samples_per_image} samples/image, "
        f"batch {cfg.train.batch_size}, {args.epochs} epochs, selection every "
        f"{cfg.train.select_every}"
    )
    print("| scale | train s/epoch | set s | select s | added | former select s | former added |")
    print("|---|---|---|---|---|---|---|")
    for scale in scales:
        model = build_scale_model(cfg, scale, None)
        tr = ScaleTrainer(cfg.replace(**{"train.max_steps": args.steps}), scale, model)
        x = normalize(train)
        t0 = time.perf_counter()
        tr.update_centers(x, 0)
        t_centers = time.perf_counter() - t0
        tr.train_epoch(x, 0)  # warm-up
        t0 = time.perf_counter()
        tr.steps = 0
        tr.train_epoch(x, 0)
        per_step = (time.perf_counter() - t0) / args.steps
        t_epoch = per_step * tr._steps(x.shape[0], cfg.train.batch_size) + t_centers
        selection._CACHE.clear()
        selection._LAST_SET[:] = [None, None]
        t0 = time.perf_counter()
        sel = selection.SelectionSet.build(cfg, train, val)
        t_build = time.perf_counter() - t0
        maps = selection.scale_maps(model.encoder, sel, cfg)
        selection.detection_metrics(maps, sel, cfg)
        t_sel = time.perf_counter() - t0 - t_build
        e, every = args.epochs, cfg.train.select_every
        n_cand = 1 + sum(1 for k in range(1, e + 1) if k % every == 0 or k == e)
        added = (t_build + n_cand * t_sel) / (e * t_epoch)
        former = "-"
        former_added = "-"
        if not args.no_former:
            t_old = former_selection(model.encoder, cfg, train, val)
            former = f"{t_old:.1f}"
            former_added = f"{((e + 3) * t_old) / (e * t_epoch):.0%}"
        print(
            f"| {scale} | {t_epoch:.1f} | {t_build:.1f} | {t_sel:.1f} | {added:.0%} | {former} | "
            f"{former_added} |",
            flush=True,
        )


if __name__ == "__main__":
    with use_run(progress=False):  # figures, not bars
        main()
