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
        metrics, extra = _demo_ray(cfg, uris, samples, root, bundle, maps, progress)
    else:
        metrics, extra = _demo_local(cfg, uris, samples, bundle, maps, progress), []
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


def _demo_local(cfg: MSPrayConfig, uris, samples, bundle: str, maps: str, progress: bool):
    from mspray.bundle import load_bundle
    from mspray.evaluate import evaluate
    from mspray.fit import fit_detector

    fit_detector(cfg, uris, out=bundle, progress=progress)
    return evaluate(load_bundle(bundle), samples, maps_dir=maps, progress=progress)


def _demo_ray(cfg: MSPrayConfig, uris, samples, root: Path, bundle: str, maps: str, progress: bool):
    """Train (Ray Train) -> banks (Ray Data) -> batch scoring + evaluation (Ray Data) ->
    one request to a Ray Serve endpoint."""
    import ray

    from mspray.config import PoolConfig
    from mspray.fit import fit_detector
    from mspray.ray.data.banks import build_banks
    from mspray.ray.data.evaluation import evaluate_ray
    from mspray.ray.data.scoring import score_prefix
    from mspray.ray.runtime import init_ray
    from mspray.ray.train import ray_scale_trainer

    init_ray(progress=progress)  # >= 4 logical CPUs: see README "Things worth knowing"
    try:
        cfg = cfg.replace(**{"train.workers": 1})
        trainer = ray_scale_trainer(storage=str(root / "ray_runs"), progress=progress)
        fit_detector(cfg, uris, out=bundle, trainer=trainer, progress=progress, build_banks=False)
        pool = PoolConfig(workers=2)
        build_banks(bundle, uris, pool=pool, progress=progress)
        summary = score_prefix(
            bundle,
            str(root / "data" / "synthetic" / "test"),
            str(root / "scores"),
            pool=pool,
            maps=True,
            progress=progress,
        )
        metrics = evaluate_ray(bundle, samples, maps_dir=maps, pool=pool, progress=progress)
        served = _serve_one(bundle, samples[-1].path)
    finally:
        ray.shutdown()
    extra = [
        ("batch scoring", summary.line()),
        ("serve request", json.dumps(served)),
    ]
    return metrics, extra


def _serve_one(bundle: str, image: str) -> dict:
    """Deploy the Serve app on a free loopback port, POST one image, tear it down."""
    import socket
    import urllib.request

    from ray import serve

    from mspray.ray.serve.app import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(
            build_app({"bundle": bundle, "replicas": 1}), name="mspray-demo", route_prefix="/"
        )
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/predict",
            data=Path(image).read_bytes(),
            headers={"Content-Type": "image/png"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())
    finally:
        serve.shutdown()
