"""``mspray serve``, ``mspray deploy`` and ``mspray export``: putting a bundle to work.

``serve`` runs a local endpoint until Ctrl-C (:mod:`mspray.ray.serve.run`); ``deploy``
sends a Serve config with setting overrides to a running cluster
(:mod:`mspray.ray.serve.deploy`, also behind ``ray_jobs/deploy.py``); ``export`` writes the
ONNX encoders and banks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from mspray import storage
from mspray.cli.flags import (
    add_address_flag,
    add_serve_settings,
    add_shared_fs_flag,
    refuse_node_local,
    serve_config_from_args,
    serve_overrides,
)
from mspray.config import ConfigError
from mspray.config.run import use_run

log = logging.getLogger("mspray")

SERVE_EPILOG = """\
routes:
  POST /v1/predict[?map=true]  one image as the raw body (image/*, application/octet-stream)
                               or a multipart/form-data file field 'file'; returns
                               {image_score, is_anomalous, threshold, model_version}, and
                               with map=true also scale_scores and anomaly_map_png (base64);
                               ?model=NAME (or header serve_multiplexed_model_id: NAME)
                               picks one of several bundles (--bundle NAME=URI)
  GET  /v1/models              served names, bundle versions, which are loaded
  GET  /v1/model[?model=NAME]  bundle config, version, scales, bank sizes, limits
  GET  /v1/stats               executed batch sizes and rejections of the replica
  GET  /healthz

examples:
  mspray serve --bundle runs/bottle
  mspray serve --bundle s3://models/bottle --port 8080 --replicas 1 --max-replicas 4
  mspray serve --bundle screw=s3://models/screw --bundle bottle=s3://models/bottle
  curl --data-binary @img.png -H 'content-type: image/png' 'localhost:8000/v1/predict?model=screw'
  curl --data-binary @img.png -H 'content-type: image/png' localhost:8000/v1/predict
  curl -F file=@img.png 'localhost:8000/v1/predict?map=true'
"""


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP endpoint for a bundle on Ray Serve (batched, autoscaled); blocks until Ctrl-C",
        description="Serve a model bundle over HTTP with Ray Serve: concurrent requests are "
        "batched into one forward pass and one bank search, and bad input gets a 4xx JSON "
        "error. Blocks until Ctrl-C (or SIGTERM), then removes the endpoint. Without "
        "--address a private local Ray is started with at least 4 logical CPUs. For a cluster and "
        "zero-downtime model swaps, use serve_config.yaml with `serve deploy` instead.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    add_address_flag(p)
    add_shared_fs_flag(p)
    add_serve_settings(p.add_argument_group("serving (mspray.config.ServeConfig)"))
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from mspray.ray.serve.run import serve_forever

    cfg = serve_config_from_args(args)  # validated before anything starts
    refuse_node_local(args, [("--bundle", uri) for uri in cfg.named_models().values()])
    return serve_forever(cfg, host=args.host, port=args.port)


# ---------------------------------------------------------------------------- deploy
DEPLOY_DESCRIPTION = """\
Deploy or update the mspray Ray Serve application of a Serve config (serve_config.yaml)
on a running Ray cluster through the Serve REST API, and wait until it is RUNNING. Setting
flags override the file: reloadable ones (--bundle, --device, batching, limits) go to the
detector's user_config, so a new --bundle swaps the model in place without a restart;
replica and resource ones go to the application's args.

Where: --address (dashboard URL http://HOST:8265, or a Ray address), else
$RAY_DASHBOARD_ADDRESS, else the cluster of $RAY_ADDRESS (set by `ray job submit`), else
http://127.0.0.1:8265 (`ray start --head` on this machine).
"""
DEPLOY_EPILOG = """\
examples:
  mspray deploy --config serve_config.yaml --address http://head:8265 \\
      --bundle s3://models/screws/v4
  python ray_jobs/deploy.py --address http://head:8265 --bundle s3://models/screws/v4
  ray job submit --working-dir . -- python ray_jobs/deploy.py \\
      --bundle s3://models/screws/v4 --num-gpus 1 --max-replicas 8
  python ray_jobs/deploy.py --dry-run --bundle runs/bottle   # print the final config
"""


def write_rayservice(args: argparse.Namespace, config: dict) -> int:
    """``deploy --rayservice FILE``: the final config into FILE's serveConfigV2."""
    from pathlib import Path

    from mspray.ray.serve.rayservice import RayServiceError
    from mspray.ray.serve.rayservice import write_rayservice as write

    try:
        write(args.rayservice, config, source=Path(args.config).name)
    except RayServiceError as e:
        print(f"mspray deploy: error: {e}", file=sys.stderr)
        return 2
    log.info("wrote %s: apply it with `kubectl apply -f %s`", args.rayservice, args.rayservice)
    return 0


def add_deploy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy",
        help="deploy or update serve_config.yaml on a running cluster; waits for RUNNING",
        description=DEPLOY_DESCRIPTION,
        epilog=DEPLOY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        required=True,
        help="Serve config YAML (ray_jobs/deploy.py: the repository's serve_config.yaml)",
    )
    p.add_argument(
        "--app",
        help="application to change (default: the one using mspray.ray.serve:build_app)",
    )
    p.add_argument(
        "--address",
        help="Ray dashboard URL (http://HOST:8265) or Ray address (default: "
        "$RAY_DASHBOARD_ADDRESS, the cluster of $RAY_ADDRESS, else http://127.0.0.1:8265)",
    )
    p.add_argument("--http-host", help="HTTP proxy host (only takes effect when Serve starts)")
    p.add_argument("--http-port", type=int, help="HTTP proxy port (only when Serve starts)")
    p.add_argument(
        "--http-address",
        help="the Serve HTTP proxy as this machine reaches it (e.g. a load balancer or a "
        "port-forward of 8000), to confirm the rollout replica by replica; default: the "
        "dashboard host's proxy port if it is reachable, else a check job on the head node "
        "submitted through the dashboard",
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for RUNNING (%(default)s)"
    )
    p.add_argument("--no-wait", action="store_true", help="return once the config is accepted")
    p.add_argument(
        "--no-bundle-check", action="store_true", help="do not check the bundle's meta.json"
    )
    p.add_argument("--dry-run", action="store_true", help="print the final config and exit")
    p.add_argument(
        "--rayservice",
        metavar="FILE",
        help="KubeRay: write the final config (bundle roots pinned to their current version) "
        "as the serveConfigV2 of this RayService manifest, for `kubectl apply`, instead of "
        "deploying (the operator would revert a change made through the dashboard)",
    )
    add_shared_fs_flag(p)
    add_serve_settings(
        p.add_argument_group("settings (mspray.config.ServeConfig; override the config file)")
    )
    p.set_defaults(func=cmd_deploy)


def cmd_deploy(args: argparse.Namespace) -> int:
    """Deploy as the flags say; prints a JSON summary. Exit 2 on an invalid config or a
    deployment that did not come up."""
    from mspray.ray.serve import deploy as serve_deploy

    try:
        config = serve_deploy.apply_overrides(
            serve_deploy.load_config(args.config),
            serve_overrides(args),  # typed by argparse, checked in check_config
            app=args.app,
            http_host=args.http_host,
            http_port=args.http_port,
        )
        check_bundle = not (args.no_bundle_check or args.dry_run)
        settings = serve_deploy.check_config(config, check_bundle=check_bundle)
        if args.dry_run:
            print(json.dumps(config, indent=2), flush=True)
            return 0
        if args.rayservice:
            return write_rayservice(args, config)
        url = serve_deploy.dashboard_url(args.address)
        refuse_node_local_bundles(args, url, settings.values())
        bundles = ", ".join(str(s.named_models() or "?") for s in settings.values())
        log.info("deploying %s (bundle %s) through %s", args.config, bundles, url)
        result = serve_deploy.deploy(
            config,
            url,
            wait=not args.no_wait,
            timeout=args.timeout,
            settings=settings,
            http_address=args.http_address,
        )
    except serve_deploy.DeployError as e:
        print(f"mspray deploy: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2), flush=True)
    return 0


def refuse_node_local_bundles(args: argparse.Namespace, url: str, settings: Any) -> None:
    """:func:`refuse_node_local` for the bundles of a deploy through the dashboard ``url``:
    a cluster whose dashboard is on another machine never sees this machine's disk; inside
    ``ray job submit`` (``$RAY_ADDRESS``, the head) the cluster is asked for its nodes and
    node types. Without ``$RAY_ADDRESS`` a dashboard here is taken as this machine alone."""
    local = [
        ("--bundle", uri)
        for s in settings
        for uri in s.named_models().values()
        if storage.is_local(uri)
    ]
    if not local or getattr(args, "shared_fs", False):
        return
    from urllib.parse import urlparse

    from mspray.ray.runtime import this_machine

    host = urlparse(url).hostname or ""
    if not this_machine(host):
        raise ConfigError(
            f"{', '.join(f'{f} {u}' for f, u in local)}: on this machine's disk, but the "
            f"cluster at {url} is another machine. Use storage every node reaches "
            "(s3://...), or pass --shared-fs if every node mounts it at the same path."
        )
    if os.environ.get("RAY_ADDRESS"):
        with use_run(address=os.environ["RAY_ADDRESS"]):
            refuse_node_local(args, local)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a bundle as ONNX encoders, faiss banks and a JSON spec",
        description="Write encoder_<scale>.onnx (dynamic batch and image size), "
        "bank_<scale>.faiss and mspray_export.json (scales, strides, normalisation, fusion "
        "stats, threshold) to --out. Score them without torch with "
        "`python -m mspray.onnx.runtime OUT image.png`. Needs onnx (pip install "
        "'mspray[export]').",
    )
    p.add_argument("--bundle", required=True, help="bundle directory (local path or s3://)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    p.add_argument("--out", required=True, help="output directory (local)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from mspray.onnx.export import export_bundle

    spec = export_bundle(args.bundle, args.out, args.format)
    print(json.dumps({"out": args.out, "scales": spec["scales"], "version": spec["version"]}))
    return 0
