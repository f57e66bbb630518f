"""``mspray demo``: synthetic data -> train three scales -> banks -> evaluate -> overlays.

Sized to finish in a few minutes on 2 CPU cores: 128×128 synthetic texture images, a few
epochs with fewer samples per image than the paper (the paper's values are the config
defaults for real data). With ``use_ray`` the Ray layers run on an embedded local Ray.
"""

from __future__ import annotations

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


def run_demo(
    out: str, epochs: int | None = None, use_ray: bool = True, progress: bool = True
) -> dict:
    """Run the whole demo under ``out``; returns the metrics dict."""
    from mspray.bundle import load_bundle
    from mspray.data.datasets import test_samples, train_paths
    from mspray.data.synthetic import make_synthetic_dataset
    from mspray.evaluate import evaluate
    from mspray.fit import fit_detector

    t0 = time.perf_counter()
    root = Path(out).resolve()
    cfg = demo_config(epochs)
    data = root / "data"
    make_synthetic_dataset(
        str(data),
        category="synthetic",
        n_train=24,
        n_test_good=8,
        n_test_defect=16,
        size=cfg.model.image_size,
        seed=0,
    )
    spec = f"mvtec:{data}"
    bundle = str(root / "bundle")
    trainer = None
    if use_ray:
        from mspray.train.ray_train import ray_scale_trainer

        cfg = cfg.replace(**{"train.workers": 1})
        trainer = ray_scale_trainer(run_name="mspray-demo", storage=str(root / "ray_runs"))
    fit_detector(
        cfg, train_paths(spec, "synthetic"), out=bundle, trainer=trainer, progress=progress
    )
    det = load_bundle(bundle)
    metrics = evaluate(
        det, test_samples(spec, "synthetic"), maps_dir=str(root / "maps"), progress=progress
    )
    (root / "metrics.json").write_text(json.dumps(metrics, indent=2))
    rows = [
        (k, metrics[k])
        for k in (
            "image_auroc",
            "pixel_auroc",
            "pixel_aupro",
            "f1_max",
            "threshold",
            "n_images",
            "seconds_per_image",
        )
    ]
    rows += [(f"image_auroc[scale {s}]", v) for s, v in metrics["scale_image_auroc"].items()]
    rows.append(("total_seconds", time.perf_counter() - t0))
    print(format_table(rows))
    print(f"\nbundle: {bundle}\noverlays: {root / 'maps'}\nmetrics: {root / 'metrics.json'}")
    return metrics
