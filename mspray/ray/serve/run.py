"""``mspray serve``: the detector endpoint on a local Ray (or a cluster), until Ctrl-C.

Kept here, next to the deployment, so ``mspray/cli.py`` only registers the subcommand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from mspray.ray.serve.app import AppArgs

log = logging.getLogger("mspray")

APP_NAME = "mspray"
#: Logical CPUs of a local Ray started on demand (at least): every replica holds --num-cpus
#: of them, so a 2-core laptop could otherwise not place more than two replicas.
LOCAL_RAY_CPUS = 4

DESCRIPTION = """\
Serve a model bundle over HTTP with Ray Serve: concurrent requests are batched into one
forward pass and one bank search, and bad input gets a 4xx JSON error.

Routes:
  POST /v1/predict[?map=true]  one image as the raw body (image/*, application/octet-stream)
                               or a multipart/form-data file field 'file'; returns
                               {image_score, is_anomalous, threshold, model_version}, and
                               with map=true also scale_scores and anomaly_map_png (base64)
  GET  /v1/model               bundle config, version, scales, bank sizes, limits
  GET  /v1/stats               executed batch sizes and rejections of the replica
  GET  /healthz

Blocks until Ctrl-C (or SIGTERM), then removes the endpoint. Without --address a local
Ray is started with at least 4 logical CPUs. For a cluster and zero-downtime model swaps,
use serve_config.yaml with `serve deploy` instead.
"""

EPILOG = """\
examples:
  mspray serve --bundle runs/bottle
  mspray serve --bundle s3://models/bottle --port 8080 --replicas 1 --max-replicas 4
  curl --data-binary @img.png -H 'content-type: image/png' localhost:8000/v1/predict
  curl -F file=@img.png 'localhost:8000/v1/predict?map=true'
"""


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bundle", metavar="URI", required=True, help="model bundle (local path or s3://)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s; 0.0.0.0 for all)",
    )
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    g = p.add_argument_group("replicas and resources")
    g.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="replicas (default: %(default)s); with --max-replicas, the minimum "
        "of the autoscaling range",
    )
    g.add_argument(
        "--max-replicas", type=int, metavar="M", help="autoscale between --replicas and M on load"
    )
    g.add_argument(
        "--target-ongoing-requests",
        metavar="R",
        type=float,
        default=16,
        help="autoscaling target of in-flight requests per replica (default: %(default)s)",
    )
    g.add_argument(
        "--num-cpus",
        metavar="C",
        type=float,
        default=1,
        help="CPUs per replica (torch threads follow it; default: %(default)s)",
    )
    g.add_argument(
        "--num-gpus",
        metavar="G",
        type=float,
        default=0,
        help="GPUs per replica (default: %(default)s)",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto (default)")
    g.add_argument("--bank-gpu", action="store_true", help="faiss bank search on the GPU")
    g = p.add_argument_group("batching and input limits")
    g.add_argument(
        "--max-batch-size",
        metavar="N",
        type=int,
        default=16,
        help="requests sharing one forward pass (default: %(default)s)",
    )
    g.add_argument(
        "--batch-wait-ms",
        metavar="MS",
        type=float,
        default=20,
        help="how long a batch waits to fill up (default: %(default)s ms)",
    )
    g.add_argument(
        "--max-image-bytes",
        metavar="BYTES",
        type=int,
        help="reject bodies over this size with 413 (default: the bundle's score.max_image_bytes)",
    )
    g.add_argument(
        "--max-image-pixels",
        metavar="PIXELS",
        type=int,
        help="reject images with more pixels with 413 (default: the bundle's "
        "score.max_image_pixels)",
    )
    g = p.add_argument_group("ray")
    g.add_argument(
        "--address", metavar="ADDR", help="Ray cluster address (default: start a local Ray)"
    )
    g.add_argument(
        "--ray-cpus",
        metavar="N",
        type=int,
        default=LOCAL_RAY_CPUS,
        help="logical CPUs of the local Ray (default: at least %(default)s)",
    )


def app_args(args: argparse.Namespace) -> AppArgs:
    """The :func:`~mspray.ray.serve.build_app` arguments of the command line."""
    autoscale = args.max_replicas is not None
    return AppArgs(
        bundle=args.bundle,
        device=args.device,
        bank_gpu=args.bank_gpu,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1000.0,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        num_replicas=None if autoscale else args.replicas,
        min_replicas=args.replicas,
        max_replicas=args.max_replicas if autoscale else args.replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        max_ongoing_requests=max(64, 4 * args.max_batch_size),
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Start the endpoint and block until Ctrl-C; then remove it again."""
    import ray
    from ray import serve

    from mspray.bundle import resolve_bundle
    from mspray.ray.serve.app import build_app

    # pin a root to its current version, so replicas started later (autoscaling) load the
    # same model and not whatever `latest` names by then
    args.bundle = resolve_bundle(args.bundle)
    app = build_app(app_args(args))  # validate arguments before starting anything
    started_ray = not ray.is_initialized() and not args.address
    if args.address:
        ray.init(address=args.address)
    elif started_ray:
        ray.init(num_cpus=max(args.ray_cpus, os.cpu_count() or 1), include_dashboard=False)

    def stop() -> None:
        # our own local Ray: take Serve down with it; a shared cluster: only our app
        if started_ray:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)

    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except Exception as e:  # e.g. a bundle that cannot be loaded fails the replicas
        print(f"mspray serve: error: the deployment did not start: {e}", file=sys.stderr)
        stop()
        return 2
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{host}:{args.port}"
    print(
        json.dumps(
            {
                "url": url,
                "predict": f"{url}/v1/predict",
                "model": f"{url}/v1/model",
                "bundle": args.bundle,
            },
            indent=2,
        ),
        flush=True,
    )
    log.info("serving %s at %s; Ctrl-C to stop", args.bundle, url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        stop()
    return 0
