"""End-to-end scoring speed of mspray's inference modes vs a PaDiM-style baseline, one run.

The same synthetic test images (with masks) are scored by every mode, batch by batch and
round-robin (every mode scores batch k before any scores batch k+1), so load from other
processes hits all modes alike and the ratios stay meaningful on a shared machine. Printed
per mode: seconds per image for each stage (decode, each scale's encoder and bank search,
maps (fusion + smoothing), image score), total s/img including decode, the speed ratio to
the baseline, and image / pixel AUROC.

mspray modes (one detector: encoders, banks, stats and threshold shared; only
``score.precision`` / ``score.channels_last`` / ``score.runtime`` differ):

- ``fp32-nchw``: fp32, contiguous NCHW, the unoptimised baseline;
- ``fp32``: fp32 + channels_last, fp32 search pre-selection (the reference the
  reduced-precision modes are held to, and the default on a CPU without native bf16);
- ``default``: the default config (``precision="auto"`` resolves per device; channels_last;
  the exact torch bank search on the scoring device: by cells on CPU, dense on CUDA);
- ``fp32-dense`` / ``default-dense``: ``fp32`` / ``default`` with the dense torch search
  (``bank.search_cells="off"``), the search before cells;
- ``default-faiss``: the default with the bank search on faiss (``bank.search="faiss"``);
- ``default-random``: the default on a second detector fitted from a random-init trunk
  (every scale its own stem, computed per scale; the others use the ImageNet path with
  a stand-in weights file, where the scales share one stem);
- ``stage-one``: the default on a detector whose random-init trunk stage one trained
  (``train.stage_one``), shared by the scales as one stem (``model.shared_stem=true``);
- ``bf16``: bf16 autocast + channels_last (only fast on CPUs with AVX512-BF16 / AMX);
- ``fp16``: fp16 autocast (CUDA only);
- ``onnx``: encoders on ONNX Runtime (``score.runtime="onnx"``);
- ``compile``: ``torch.compile`` of each encoder (start-up reported separately).

Baseline ``padim``: a VGG16 with padding to relu4_3 whose first seven convolutions are
mspray's random-init scale-64 prefix weights (conv4 seeded random init, as ``pretrained=
false``); relu2_2 (average-pooled 2x), relu3_3 and relu4_3 (upsampled 2x) concatenated at
1/4 resolution, 100 random channels (PaDiM-R100), a Gaussian per position (covariance +
0.01·I) and the Mahalanobis distance, upsampled to the image, blurred (sigma 4), max = image
score. ``padim-onnx`` runs the same VGG on ONNX Runtime.

    nice python benchmarks/bench_e2e.py [--image-size 256] [--n-train 20] [--modes ...]
    python benchmarks/bench_e2e.py --bundle /tmp/e2e-bundle   # reruns skip the fit
    python benchmarks/bench_e2e.py --device cuda          # GPU: images/s, same breakdown
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mspray import maps as M
from mspray.artifacts.bundle import load_bundle
from mspray.config import MSPrayConfig
from mspray.config.run import use_run
from mspray.data.datasets import test_samples, train_paths
from mspray.data.images import load_image, load_images, load_mask
from mspray.data.synthetic import DEFECTS, _add_defect, make_synthetic_dataset, write_png
from mspray.data.tiles import _png
from mspray.detector import Detector, cpu_has_native_bf16
from mspray.evaluation.metrics import image_auroc, pixel_auroc
from mspray.model.backbone import random_stem_state
from mspray.model.multiscale import normalize
from mspray.pipeline.steps import fit_detector

# ---------------------------------------------------------------------- PaDiM-style baseline
_VGG_TO_RELU4_3 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
_TAPS = {8: "relu2_2", 15: "relu3_3", 22: "relu4_3"}  # module index of the ReLU after each


class PadimVGG(nn.Module):
    """Padded VGG16 to relu4_3 returning the three PaDiM taps, all at 1/4 resolution."""

    def __init__(self, prefix_state: dict[str, torch.Tensor], seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG_TO_RELU4_3:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        # the same random-init weights as mspray's scale-64 VGG prefix, where it has them
        own = self.features.state_dict()
        own.update({k: v for k, v in prefix_state.items() if k in own})
        self.features.load_state_dict(own)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                taps.append(x)
        a, b, c = taps
        a = F.avg_pool2d(a, 2)
        c = F.interpolate(c, scale_factor=2, mode="nearest")
        return torch.cat([a, b, c], 1)


class Padim:
    """Gaussian per feature position, Mahalanobis distance (Defard et al., 2020)."""

    def __init__(
        self, vgg: PadimVGG, n_dims: int = 100, sigma: float = 4.0, seed: int = 0, device="cpu"
    ):
        self.device = torch.device(device)
        self.vgg = vgg.eval().to(self.device)
        self.n_dims, self.sigma = n_dims, sigma
        self.idx = torch.randperm(128 + 256 + 512, generator=torch.Generator().manual_seed(seed))
        self.idx = self.idx[:n_dims].sort().values.to(self.device)
        self.onnx = None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images.to(self.device))
        if self.onnx is not None:
            f = torch.from_numpy(self.onnx.run(None, {"images": x.numpy()})[0])
        else:
            with torch.inference_mode():
                f = self.vgg(x)
        return f[:, self.idx]  # B×d×h×w

    def fit(self, images: torch.Tensor, batch: int = 8) -> None:
        f = torch.cat([self.features(images[i : i + batch]) for i in range(0, len(images), batch)])
        n, d, h, w = f.shape
        x = f.permute(2, 3, 0, 1).reshape(h * w, n, d).double()  # P×N×d
        self.mean = x.mean(1)  # P×d
        xc = x - self.mean[:, None]
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        cov = xc.transpose(1, 2) @ xc / max(n - 1, 1) + 0.01 * eye
        # contiguous: linalg.inv returns column-major matrices, which bmm would copy per call
        self.prec = torch.linalg.inv(cov).float().contiguous()  # P×d×d
        self.mean = self.mean.float()

    def predict(
        self, images: torch.Tensor, timings: dict[str, float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None
        t0 = time.perf_counter()
        f = self.features(images)
        sync()
        t1 = time.perf_counter()
        b, d, h, w = f.shape
        diff = (f.permute(2, 3, 0, 1).reshape(h * w, b, d) - self.mean[:, None]).contiguous()
        # one batched matrix product over positions: (P×B×d)·(P×d×d)
        dist = (torch.bmm(diff, self.prec) * diff).sum(-1).clamp_min(0).sqrt()
        sync()
        t2 = time.perf_counter()
        m = dist.T.reshape(b, 1, h, w)
        m = F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=False)
        m = M.gaussian_smooth(m[:, 0], self.sigma)
        scores = m.flatten(1).amax(1)
        sync()
        t3 = time.perf_counter()
        for k, v in (("encoder", t1 - t0), ("gaussian", t2 - t1), ("maps", t3 - t2)):
            timings[k] = timings.get(k, 0.0) + v
        return scores, m


# ---------------------------------------------------------------------- mspray modes
#: the shipped scoring defaults, whatever the base detector was fitted with
DEFAULTS = {
    **{f"score.{k}": getattr(MSPrayConfig().score, k) for k in ("precision", "channels_last")},
    "score.runtime": MSPrayConfig().score.runtime,
    **{
        f"bank.{k}": getattr(MSPrayConfig().bank, k)
        for k in ("search", "search_precision", "search_cells")
    },
}


def make_photo_dataset(
    root: str,
    category: str,
    n_train: int,
    n_test_good: int,
    n_test_defect: int,
    size: int,
    seed: int,
) -> None:
    """An MVTec-layout set of ``size``-pixel crops at seeded random places of a real photo
    (scikit-learn's bundled ``china.jpg``, 427×640, JPEG): camera noise, JPEG blocks and an
    image size other than the model's, which the decode stage resizes. Training crops come
    from the left 60 % of the photo, test crops from anywhere (a third of them fall on
    training ground, as new shots of a product would), defects drawn as in the synthetic
    set."""
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg").astype(np.float32) / 255
    h, w = photo.shape[:2]
    if size > h:
        raise ValueError(f"--photo {size}: the photo is {h}x{w}")
    rng = np.random.default_rng(seed)
    region = np.ones((size, size), bool)

    def crop(x_max: int) -> np.ndarray:
        y, x = rng.integers(0, h - size + 1), rng.integers(0, x_max - size + 1)
        return photo[y : y + size, x : x + size].copy()

    cat = Path(root) / category
    for k in range(n_train):
        write_png(str(cat / "train" / "good" / f"{k:04d}.png"), _png(crop(int(0.6 * w))))
    for k in range(n_test_good + n_test_defect):
        tile = crop(w)
        if k < n_test_good:
            write_png(str(cat / "test" / "good" / f"{k:04d}.png"), _png(tile))
            continue
        defect = DEFECTS["texture"][k % 3]
        img, mask = _add_defect(tile, region, defect, rng)
        write_png(str(cat / "test" / defect / f"{k:04d}.png"), _png(img))
        mask_png = mask.astype(np.uint8) * 255
        write_png(str(cat / "ground_truth" / defect / f"{k:04d}_mask.png"), mask_png)


#: Trunks fitted without ImageNet weights, scored in mode ``default``: ``default-random`` a
#: random-init trunk (a stem per scale, the no-ImageNet default); ``stage-one`` the trunk
#: stage one trains (mspray/train/stage_one.py), which the scales share as one stem like an
#: ImageNet trunk. Its speed does not depend on the weights' values, so a few steps do.
NO_IMAGENET_MODES: dict[str, dict] = {
    "default-random": {"model.pretrained": False},
    "stage-one": {
        "model.pretrained": False,
        "train.stage_one": True,
        "train.stage_one_steps": 4,
        "model.shared_stem": True,
    },
}


def mode_detector(base: Detector, mode: str) -> Detector:
    """A detector sharing ``base``'s weights, banks and calibration, in ``mode``."""
    over = {
        "fp32-nchw": {"score.precision": "fp32", "score.channels_last": False},
        # what "auto" resolves to on a CPU without native bf16
        "fp32": {"score.precision": "fp32", "bank.search_precision": "fp32"},
        "fp32-dense": {
            "score.precision": "fp32",
            "bank.search_precision": "fp32",
            "bank.search_cells": "off",
        },
        "default": DEFAULTS,
        "default-dense": {**DEFAULTS, "bank.search_cells": "off"},
        "default-faiss": {**DEFAULTS, "bank.search": "faiss"},
        "bf16": {"score.precision": "bf16"},
        "fp16": {"score.precision": "fp16"},
        "onnx": {"score.runtime": "onnx"},
        "compile": {},
    }[mode]
    cfg = base.cfg.replace(**over)
    model = copy.deepcopy(base.model).to(memory_format=torch.contiguous_format)
    det = Detector(
        cfg, model, base.banks, base.stats, base.threshold, base.meta, device=base.device
    )
    if mode == "compile":
        for s in det.scales:
            sm = det.model.scales[str(s)]
            sm.encoder = torch.compile(sm.encoder)
    return det


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--n-train", type=int, default=20, help="bank / Gaussian images")
    ap.add_argument("--n-good", type=int, default=8)
    ap.add_argument("--n-defect", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=0, help="mspray training epochs per scale")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--modes",
        default="auto",
        help="comma-separated subset of fp32-nchw,fp32,fp32-dense,default,default-dense,"
        "default-random,stage-one,default-faiss,bf16,"
        "fp16,onnx,"
        "compile,padim,"
        "padim-onnx; 'auto': those that can be fast on this device",
    )
    ap.add_argument("--repeats", type=int, default=1, help="passes over the test set (median)")
    ap.add_argument(
        "--photo",
        type=int,
        default=0,
        metavar="PX",
        help="images: PX-pixel crops of a real photo (resized to --image-size on decode) "
        "instead of synthetic texture made at --image-size",
    )
    ap.add_argument(
        "--bundle", help="save the fitted detector here, or load it when it exists (reruns)"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.modes == "auto":
        modes = ["fp32-nchw", "fp32", "default", "default-random", "default-faiss"]
        if device.type == "cpu":
            modes += (["bf16"] if cpu_has_native_bf16() else []) + ["onnx", "padim", "padim-onnx"]
        else:
            modes += ["bf16", "padim"]
    else:
        modes = args.modes.split(",")

    root = tempfile.mkdtemp(prefix="mspray-e2e-")
    make = make_photo_dataset if args.photo else make_synthetic_dataset
    make(
        root,
        "synthetic",
        n_train=args.n_train,
        n_test_good=args.n_good,
        n_test_defect=args.n_defect,
        size=args.photo or args.image_size,
        seed=5,
    )
    spec = f"mvtec:{root}"
    # The fitted trunk is ImageNet's path: a stand-in weights file (seeded random VGG16
    # layers; none can be downloaded here, and the cost does not depend on the values), so
    # the scales share one stem as with real ImageNet weights. Mode ``default-random``
    # fits a second detector from a random-init trunk (a stem per scale).
    stand_in = Path(root) / "vgg16-stand-in.pth"
    torch.save(random_stem_state(16, seed=0), stand_in)
    cfg = MSPrayConfig().replace(
        **{
            "model.image_size": args.image_size,
            "model.weights_path": str(stand_in),
            "train.epochs": args.epochs,
            "train.device": args.device,
            "score.batch_size": args.batch_size,
            # banks and calibration in fp32: the reference every faster mode is held to
            "score.precision": "fp32",
        }
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.bundle and Path(args.bundle).exists():  # the same data (seeded) fitted before
        base = load_bundle(args.bundle, config=cfg)
    else:
        base = fit_detector(cfg, train_paths(spec, "synthetic"), out=args.bundle)
    base_fit = time.perf_counter() - t0
    base = Detector(base.cfg, base.model, base.banks, base.stats, base.threshold, base.meta, device)

    samples = test_samples(spec, "synthetic")
    size = args.image_size
    t0 = time.perf_counter()
    images = torch.stack([load_image(s.path, size) for s in samples])
    decode = (time.perf_counter() - t0) / len(samples)
    labels = np.array([s.label for s in samples])
    masks = torch.stack([load_mask(s.mask_path if s.label else None, size) for s in samples])

    runners, startup = {}, {}
    for mode in modes:
        t0 = time.perf_counter()
        if mode.startswith("padim"):
            vgg = PadimVGG(
                {
                    k: v
                    for k, v in base.model.encoder(64 if 64 in base.scales else base.scales[0])
                    .features.state_dict()
                    .items()
                },
            )
            pad = Padim(vgg, device=device)
            if mode == "padim-onnx":
                from mspray.onnx.convert import encoder_to_onnx, onnx_session

                pad.onnx = onnx_session(encoder_to_onnx(vgg, 64))
            pad.fit(load_images(train_paths(spec, "synthetic"), size))
            runners[mode] = pad.predict
        else:
            if mode in NO_IMAGENET_MODES:
                fitted = fit_detector(
                    cfg.replace(**NO_IMAGENET_MODES[mode]), train_paths(spec, "synthetic")
                )
                det = mode_detector(fitted, "default")
            else:
                det = mode_detector(base, mode)

            def run(x, timings, det=det):
                p = det.predict(x.to(det.device), timings)
                return p.image_scores, p.maps

            runners[mode] = run
            run(images[: args.batch_size], {})  # warm-up (and compilation)
        startup[mode] = time.perf_counter() - t0

    timings = {m: [defaultdict(float) for _ in range(args.repeats)] for m in modes}
    outputs: dict[str, tuple[list, list]] = {m: ([], []) for m in modes}
    bs = args.batch_size
    for r in range(args.repeats):
        for i in range(0, len(samples), bs):
            x = images[i : i + bs]
            for mode in modes:
                t0 = time.perf_counter()
                sc, mp = runners[mode](x, timings[mode][r])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings[mode][r]["total"] += time.perf_counter() - t0
                if r == 0:
                    outputs[mode][0].append(sc.float().cpu())
                    outputs[mode][1].append(mp.float().cpu())

    n = len(samples)
    print(
        (f"photo crops {args.photo}px -> {size}px" if args.photo else f"synthetic {size}px")
        + f", {args.n_train} bank images, {n} test images, batch {bs}, "
        f"device {args.device}, threads {torch.get_num_threads()}, native CPU bf16 "
        f"{cpu_has_native_bf16()}, bank sizes "
        + "/".join(str(base.banks[s].ntotal) for s in base.scales)
        + f", fit {base_fit:.0f} s"
    )
    stages = ["decode", "stem"]
    for s in base.scales:
        stages += [f"encoder_{s}", f"search_{s}"]
    stages += ["encoder", "gaussian", "maps", "score"]
    med = {
        m: {
            k: statistics.median(t[k] for t in timings[m]) / n
            for k in set().union(*timings[m]) | {"total"}
        }
        for m in modes
    }
    ref = "padim" if "padim" in modes else modes[0]
    ref_total = med[ref]["total"] + decode
    short = {f"encoder_{s}": f"enc{s}" for s in base.scales}
    short.update({f"search_{s}": f"srch{s}" for s in base.scales})
    short.update(encoder="vgg", gaussian="gauss")
    head = f"{'mode':<11} " + " ".join(f"{short.get(k, k):>7}" for k in stages)
    head += (
        f" {'s/img':>7} {'x padim':>7} {'img/s':>6} {'img AUROC':>9} {'px AUROC':>8} {'start s':>7}"
    )
    print("seconds per image per stage; x padim = baseline s/img / mode s/img (decode included)")
    print(head + "\n" + "-" * len(head))
    for m in modes:
        scores = torch.cat(outputs[m][0]).numpy()
        maps = torch.cat(outputs[m][1]).numpy()
        total = med[m]["total"] + decode
        cells = []
        for k in stages:
            v = decode if k == "decode" else med[m].get(k)
            cells.append(f"{v:>7.3f}" if v is not None else f"{'':>7}")
        print(
            f"{m:<11} " + " ".join(cells) + f" {total:>7.3f} {ref_total / total:>7.2f}"
            f" {1 / total:>6.2f} {100 * image_auroc(labels, scores):>9.2f}"
            f" {100 * pixel_auroc(masks.numpy(), maps):>8.2f} {startup[m]:>7.1f}"
        )
    if "default" in modes:
        det = mode_detector(base, "default")
        search = "cells" if det.search_cells else f"dense, {det.search_precision} pre-selection"
        print(f"default mode resolved to {det.inference_mode}, bank search: {search}")


if __name__ == "__main__":
    with use_run(progress=False):  # figures, not bars
        main()
