"""The Ray half of ``mspray demo`` (:mod:`mspray.cli.demo`): every Ray layer on one local Ray.

Ray Train trains the three scales, Ray Data builds the banks and batch-scores the test
folder to Parquet + heatmaps, and a Ray Serve endpoint answers one HTTP request.
"""

from __future__ import annotations

import json
from pathlib import Path

from mspray.config import MSPrayConfig


def run_ray_demo(
    cfg: MSPrayConfig, uris, samples, root: Path, bundle: str, maps: str
) -> tuple[dict, list[tuple[str, object]]]:
    """Train (Ray Train) -> banks (Ray Data) -> batch scoring + evaluation (Ray Data) ->
    one request to a Ray Serve endpoint."""
    import ray

    from mspray.config import PoolConfig
    from mspray.config.runs import ScoreRun
    from mspray.pipeline.steps import fit_detector
    from mspray.ray.data.evaluation import evaluate_ray
    from mspray.ray.data.scoring import score_prefix
    from mspray.ray.executor import RayExecutor
    from mspray.ray.runtime import init_ray
    from mspray.ray.train import ray_scale_trainer

    init_ray()  # >= 4 logical CPUs: see README "Things worth knowing"
    try:
        cfg = cfg.replace(**{"train.workers": 1})
        pool = PoolConfig(workers=2)
        trainer = ray_scale_trainer(storage=str(root / "ray_runs"))
        executor = RayExecutor(pool=pool, trainer=trainer)
        fit_detector(cfg, uris, out=bundle, executor=executor)
        summary = score_prefix(
            ScoreRun(
                bundle=bundle,
                input=str(root / "data" / "synthetic" / "test"),
                output=str(root / "scores"),
                maps=True,
            ),
            pool=pool,
        )
        metrics = evaluate_ray(bundle, samples, maps_dir=maps, pool=pool)
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
