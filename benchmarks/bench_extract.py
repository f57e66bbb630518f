"""Dense (whole-image, fully convolutional) vs per-patch embedding extraction.

Same model, same images: every patch of the inference grid is embedded (a) densely in one
forward pass per scale, (b) by cropping all patches and running them through the encoder in
batches, and (c) one patch at a time as the public MSPBA code did (timed on a subset and
extrapolated, since it is very slow). Prints times, speed-ups and the max |difference|.

    python benchmarks/bench_extract.py [--image-size 256] [--images 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from mspray.config import MSPrayConfig
from mspray.model.multiscale import MultiScaleEncoder, normalize


def crops(images: torch.Tensor, p: int, stride: int) -> torch.Tensor:
    """All ``p×p`` patches at ``stride`` as ``(B·h·w)×3×p×p`` (row-major, like the grid)."""
    u = images.unfold(2, p, stride).unfold(3, p, stride)  # B×3×h×w×p×p
    return u.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, p, p)


def conv_macs(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every convolution when ``module`` runs on ``x``."""
    total = 0

    def hook(m, _inp, out):
        nonlocal total
        total += out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]

    hs = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        module(x)
    for h in hs:
        h.remove()
    return total


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256, help="patches per batched forward")
    ap.add_argument("--single", type=int, default=64, help="patches timed one at a time")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    cfg = MSPrayConfig().replace(**{"model.image_size": args.image_size, "model.pretrained": False})
    torch.manual_seed(0)
    model = MultiScaleEncoder(cfg).to(args.device).eval()
    images = torch.rand(args.images, 3, args.image_size, args.image_size, device=args.device)
    rows = []
    with torch.no_grad():
        for scale in cfg.model.scales:
            stride = cfg.stride_for(scale)
            enc = model.encoder(scale)
            t_dense, grid = timed(lambda s=scale: model.embed(images, s))
            patches = crops(normalize(images), scale, stride)
            n = patches.shape[0]
            t_batch, emb = timed(
                lambda p=patches, e=enc: torch.cat(
                    [e.embed_patches(p[i : i + args.batch]) for i in range(0, len(p), args.batch)]
                )
            )
            k = min(args.single, n)
            t_one, _ = timed(
                lambda p=patches, e=enc, k=k: [e.embed_patches(p[i : i + 1]) for i in range(k)],
                repeats=1,
            )
            t_one *= n / k
            err = (grid.reshape(-1, grid.shape[-1]) - emb).abs().max().item()
            flops = (conv_macs(enc, patches[:1]) * n) / conv_macs(enc, images)
            rows.append((scale, stride, n, t_dense, t_batch, t_one, err, flops))
    # MAC ratio = convolution work of cropping every patch / of the dense pass: the speed-up
    # an ideal kernel would give; overlap of neighbouring patches is what dense saves.
    print(
        f"{args.images} images {args.image_size}px, device {args.device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    head = (
        f"{'scale':>5} {'stride':>6} {'patches':>8} {'dense s':>8} {'batched s':>9} "
        f"{'one-by-one s':>12} {'x batched':>9} {'x one-by-one':>12} {'MAC ratio':>9} "
        f"{'max |diff|':>10}"
    )
    print(head)
    print("-" * len(head))
    tot = [0.0, 0.0, 0.0]
    for scale, stride, n, td, tb, to, err, fr in rows:
        tot = [tot[0] + td, tot[1] + tb, tot[2] + to]
        print(
            f"{scale:>5} {stride:>6} {n:>8} {td:>8.3f} {tb:>9.3f} {to:>12.2f} "
            f"{tb / td:>9.1f} {to / td:>12.1f} {fr:>9.1f} {err:>10.2e}"
        )
    print(
        f"{'all':>5} {'':>6} {'':>8} {tot[0]:>8.3f} {tot[1]:>9.3f} {tot[2]:>12.2f} "
        f"{tot[1] / tot[0]:>9.1f} {tot[2] / tot[0]:>12.1f}"
    )


if __name__ == "__main__":
    main()
