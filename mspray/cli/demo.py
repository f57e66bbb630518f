"""``mspray demo``: synthetic data -> train three scales -> banks -> evaluate -> overlays.

Sized to finish in a few minutes on 2 CPU cores: 128×128 synthetic texture images, a few
epochs with fewer samples per image than the paper (the paper's values are the config
defaults for real data). With ``use_ray`` the Ray layers run on a local Ray
(:mod:`mspray.ray.demo`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from mspray.config import MSPrayConfig

log = logging.getLogger(__name__)


def demo_config(epochs: int | None = None) -> MSPrayConfig:
    """The demo's small-but-complete configuration (all three scales, all four losses)."""
    return MSPrayConfig().replace(
        **{
            "model.image_size": 128,
            "model.pretrained": False,  # no network here; the same init for every run
            "train.epochs": epochs or 3,
            "train.samples_per_image": 16,
            "train.batch_size": 32,
            "train.n_centers": 16,
            "train.center_update_every": 2,
            "train.lr": 1e-4,
            "train.val_fraction": 0.2,
            "bank.coreset_ratio": 0.25,
            "score.batch_size": 8,
        }
    )


def format_table(rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    for k, v in rows:
        val = f"{v:.4f}" if isinstance(v, float) else str(v)
        lines.append(f"{k.ljust(width)}  {val}")
    return "\n".join(lines)


def run_demo(out: str, epochs: int | None = None, use_ray: bool = True) -> dict:
    """Run the whole demo under ``out``; returns the metrics dict.

    With ``use_ray``: Ray Train trains the three scales, Ray Data builds the banks and
    batch-scores the test folder to Parquet + heatmaps, and a Ray Serve endpoint answers one
    HTTP request; all on a local Ray started here. Without it, the same steps run in-process.
    """
    from mspray.data.datasets import test_samples, train_paths
    from mspray.data.synthetic import make_synthetic_dataset

    t0 = time.perf_counter()
    root = Path(out).resolve()
    cfg = demo_config(epochs)
    data = root / "data"
    make_synthetic_dataset(
        str(data),
        "synthetic",
        n_train=24,
        n_test_good=8,
        n_test_defect=16,
        size=cfg.model.image_size,
        seed=0,
    )
    spec = f"mvtec:{data}"
    uris, samples = train_paths(spec, "synthetic"), test_samples(spec, "synthetic")
    bundle, maps = str(root / "bundle"), str(root / "maps")
    if use_ray:
        from mspray.ray.demo import run_ray_demo

        metrics, extra = run_ray_demo(cfg, uris, samples, root, bundle, maps)
    else:
        metrics, extra = _demo_local(cfg, uris, samples, bundle, maps), []
    (root / "metrics.json").write_text(json.dumps(metrics, indent=2))
    keys = (
        "image_auroc",
        "pixel_auroc",
        "pixel_aupro",
        "f1_max",
        "threshold",
        "n_images",
        "seconds_per_image",
    )
    rows = [(k, metrics[k]) for k in keys]
    rows += [(f"image_auroc[scale {s}]", v) for s, v in metrics["scale_image_auroc"].items()]
    rows += extra
    rows.append(("total_seconds", time.perf_counter() - t0))
    print(format_table(rows))
    print(f"\nbundle: {bundle}\noverlays: {maps}\nmetrics: {root / 'metrics.json'}")
    return metrics


def _demo_local(cfg: MSPrayConfig, uris, samples, bundle: str, maps: str):
    from mspray.artifacts.bundle import load_bundle
    from mspray.evaluation.evaluate import evaluate
    from mspray.pipeline.steps import fit_detector

    fit_detector(cfg, uris, out=bundle)
    return evaluate(load_bundle(bundle), samples, maps_dir=maps)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="synthetic data -> train -> evaluate, end to end",
        description="Make a synthetic dataset, train all three scales, build banks, "
        "evaluate, print a metrics table and write heatmap overlays.",
    )
    p.add_argument("--out", default="mspray-demo", help="working folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per scale (demo default 3)")
    p.add_argument(
        "--local",
        action="store_true",
        help="skip the Ray layers: plain single-process training and scoring",
    )
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.out, epochs=args.epochs, use_ray=not args.local)
    return 0
