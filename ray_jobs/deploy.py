"""Deploy (or update) the mspray Serve application: ``serve deploy serve_config.yaml`` as a
job entrypoint, with the common overrides as flags.

    ray job submit --working-dir . -- python ray_jobs/deploy.py \\
        --bundle s3://models/screws/v4 --num-gpus 1 --max-replicas 8

Reads ``serve_config.yaml`` (or ``--config``), applies the flags to the ``MSPrayDetector``
deployment, checks the result (Serve's config schema, mspray's serving settings, that the
bundle resolves to a complete version; a bundle root is pinned to the version its
``latest`` names), sends it to the cluster's Serve REST API exactly like ``serve
deploy``, and waits until the application is RUNNING. Redeploying with only a new
``--bundle`` swaps the model in place (``user_config``), without restarting replicas.

Where it deploys: ``--address`` (a dashboard URL ``http://HOST:8265`` or a Ray address),
else ``$RAY_DASHBOARD_ADDRESS``, else ``$RAY_ADDRESS`` (set inside ``ray job submit``).
With none of them (plain ``python`` on a laptop) it starts a local Ray, deploys, and keeps
serving until Ctrl-C. Replicas import ``mspray`` from the nodes' Python environment
(``cluster.yaml`` installs it on every node), or from a ``runtime_env`` in the config.
``--dry-run`` prints the final config and exits without contacting Ray.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

# `python ray_jobs/x.py` puts ray_jobs/ on sys.path, not the repository root that
# `ray job submit --working-dir .` uploads: add it.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("mspray.deploy")

DEFAULT_CONFIG = REPO / "serve_config.yaml"
DEPLOYMENT = "MSPrayDetector"
#: Application states that end the wait.
_FAILED = {"DEPLOY_FAILED", "UNHEALTHY"}


class DeployError(RuntimeError):
    """The config is invalid or the application did not come up."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="deploy.py",
        description="Deploy or update the mspray Ray Serve application from serve_config.yaml.",
    )
    p.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="Serve config YAML (default: serve_config.yaml of this repository)",
    )
    p.add_argument("--app", help="application to change (default: the only one in the config)")
    p.add_argument(
        "--bundle", help="model bundle to serve (local path or s3://); sets user_config.bundle_uri"
    )
    p.add_argument("--device", help="torch device of the replicas: auto, cpu, cuda[:N]")
    p.add_argument("--bank-gpu", action="store_true", help="faiss bank search on the GPU")
    p.add_argument("--num-cpus", type=float, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, help="GPUs per replica")
    p.add_argument("--min-replicas", type=int, help="autoscaling lower bound")
    p.add_argument("--max-replicas", type=int, help="autoscaling upper bound")
    p.add_argument("--http-host", help="HTTP proxy host (only takes effect when Serve starts)")
    p.add_argument("--http-port", type=int, help="HTTP proxy port (only when Serve starts)")
    p.add_argument(
        "--address",
        help="Ray dashboard URL (http://HOST:8265) or Ray address "
        "(default: $RAY_DASHBOARD_ADDRESS, $RAY_ADDRESS, else a local Ray)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds to wait for RUNNING (default: %(default)s)",
    )
    p.add_argument("--no-wait", action="store_true", help="return after sending the config")
    p.add_argument(
        "--no-bundle-check",
        action="store_true",
        help="do not check the bundle before deploying (nor pin a bundle root to its "
        "current version)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the final config and exit")
    return p.parse_args(argv)


def load_config(path: str) -> dict[str, Any]:
    """The Serve config file as a dict."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not data.get("applications"):
        raise DeployError(f"{path}: not a Serve config with an 'applications' list")
    return data


def apply_overrides(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Copy of ``config`` with the command-line overrides on the detector deployment."""
    config = copy.deepcopy(config)
    apps = config["applications"]
    if args.app:
        matches = [a for a in apps if a.get("name") == args.app]
        if not matches:
            raise DeployError(f"no application named {args.app!r} in the config")
        app = matches[0]
    elif len(apps) == 1:
        app = apps[0]
    else:
        raise DeployError("the config has several applications: choose one with --app")
    deps = app.setdefault("deployments", [])
    dep = next((d for d in deps if d.get("name") == DEPLOYMENT), None)
    if dep is None:
        dep = {"name": DEPLOYMENT}
        deps.append(dep)
    user = dep.setdefault("user_config", {})
    if args.bundle:
        user["bundle_uri"] = args.bundle
    if args.device:
        user["device"] = args.device
    if args.bank_gpu:
        user["bank_gpu"] = True
    actor = dep.setdefault("ray_actor_options", {})
    if args.num_cpus is not None:
        actor["num_cpus"] = args.num_cpus
    if args.num_gpus is not None:
        actor["num_gpus"] = args.num_gpus
    if args.min_replicas is not None or args.max_replicas is not None:
        dep.pop("num_replicas", None)
        auto = dep.setdefault("autoscaling_config", {})
        if args.min_replicas is not None:
            auto["min_replicas"] = args.min_replicas
        if args.max_replicas is not None:
            auto["max_replicas"] = args.max_replicas
    http = config.setdefault("http_options", {})
    if args.http_host:
        http["host"] = args.http_host
    if args.http_port:
        http["port"] = args.http_port
    return config


def check_config(config: dict[str, Any], check_bundle: bool = True) -> list[str]:
    """Validate with Serve's schema and mspray's serving settings; returns the bundle URIs.

    With ``check_bundle`` each bundle must resolve to a complete version, and a bundle root
    is pinned to the version its ``latest`` names now (written into the deployment's
    ``user_config``): every replica, including ones autoscaling starts later, then loads
    that version, and redeploying a root after ``build-bank`` moved its pointer changes
    ``user_config``, which swaps the model in place."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from mspray.ray.serve import AppArgs, ServeSettings

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        raise DeployError(f"invalid Serve config: {e}") from None
    bundles: list[str] = []
    pinned: list[dict[str, Any]] = []  # the deployment of each bundle
    for app in config["applications"]:
        args = AppArgs.model_validate(app.get("args") or {})
        for dep in app.get("deployments", []):
            if dep.get("name") != DEPLOYMENT:
                continue
            user = {**args.user_config(), **(dep.get("user_config") or {})}
            try:
                settings = ServeSettings.model_validate(user)
            except ValidationError as e:
                raise DeployError(f"{app.get('name')}: invalid user_config: {e}") from None
            bundles.append(settings.bundle_uri)
            pinned.append(dep)
    if check_bundle:
        from mspray.bundle import BundleError, resolve_bundle

        for i, (uri, dep) in enumerate(zip(bundles, pinned, strict=True)):
            try:
                version = resolve_bundle(uri)
            except BundleError as e:
                raise DeployError(str(e)) from None
            if version != uri:
                log.info("bundle %s: pinned to its current version %s", uri, version)
            dep.setdefault("user_config", {})["bundle_uri"] = bundles[i] = version
    return bundles


def resolve_dashboard(address: str | None) -> tuple[str, bool]:
    """(dashboard URL, started a local Ray?) for ``address`` or the environment."""
    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        return address.rstrip("/"), False
    import ray

    if address:
        ctx = ray.init(address=address, log_to_driver=False)
        local = False
    else:
        cpus = max(4, os.cpu_count() or 1)  # replicas + Serve's own actors on small machines
        log.info("no cluster address: starting a local Ray with %d logical CPUs", cpus)
        ctx = ray.init(num_cpus=cpus, include_dashboard=True)
        local = True
    url = ctx.dashboard_url
    if not url:
        raise DeployError("this Ray cluster runs without a dashboard (the Serve REST API)")
    return (url if "://" in url else f"http://{url}"), local


def wait_running(client: Any, names: list[str], timeout: float) -> dict[str, Any]:
    """Poll the Serve REST API until every application in ``names`` is RUNNING."""
    deadline = time.monotonic() + timeout
    while True:
        apps = client.get_serve_details().get("applications", {})
        states = {n: apps.get(n, {}).get("status", "NOT_STARTED") for n in names}
        failed = {n: s for n, s in states.items() if s in _FAILED}
        if failed:
            msgs = "; ".join(f"{n}: {s}: {apps[n].get('message', '')}" for n, s in failed.items())
            raise DeployError(f"deployment failed: {msgs}")
        if all(s == "RUNNING" for s in states.values()):
            return {n: apps[n] for n in names}
        if time.monotonic() > deadline:
            raise DeployError(f"not RUNNING after {timeout:.0f}s: {states}")
        time.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = apply_overrides(load_config(args.config), args)
        bundles = check_config(config, check_bundle=not args.no_bundle_check and not args.dry_run)
        if args.dry_run:
            print(json.dumps(config, indent=2))
            return 0
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        url, local = resolve_dashboard(args.address)
        client = ServeSubmissionClient(url)
        log.info("deploying %s (bundle %s) via %s", args.config, ", ".join(bundles), url)
        client.deploy_applications(config)
        names = [a["name"] for a in config["applications"]]
        result: dict[str, Any] = {"dashboard": url, "applications": names}
        if not args.no_wait or local:
            apps = wait_running(client, names, args.timeout)
            http = config.get("http_options", {})
            result.update(
                status={n: a["status"] for n, a in apps.items()},
                route_prefix={n: a.get("route_prefix") for n, a in apps.items()},
                http=f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}",
            )
        print(json.dumps(result, indent=2), flush=True)
        if local:
            print("serving on a local Ray until Ctrl-C", flush=True)
            while True:
                time.sleep(3600)
    except (DeployError, FileNotFoundError) as e:
        print(f"deploy.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
