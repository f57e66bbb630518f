"""Deploy (or update) the Serve application of a config file on a running Ray cluster.

What ``serve deploy serve_config.yaml`` does, with mspray's settings as flags and a wait:
read the config, put the :class:`~mspray.config.ServeConfig` overrides in place (the
reloadable ones in the detector deployment's ``user_config``, the others in the
application's ``args``), validate it (Ray's public ``ServeDeploySchema``, mspray's
``ServeConfig``, the bundle's ``meta.json``), send it with ``PUT /api/serve/applications/``
of the dashboard's documented Serve REST API and poll ``GET /api/serve/applications/`` until
the applications are RUNNING. Redeploying with only a new ``--bundle`` changes only
``user_config``: the replicas swap the model in place, without a restart.

Where it deploys: ``--address`` (a dashboard URL ``http://HOST:8265``, or a Ray address),
else ``$RAY_DASHBOARD_ADDRESS``, else the cluster of ``$RAY_ADDRESS`` (set inside ``ray
job submit``), else a ``ray start --head`` on this machine (``http://127.0.0.1:8265``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any

from mspray.config import ConfigError, ServeConfig, validate
from mspray.ray.serve.app import DEPLOYMENT_NAME as DEPLOYMENT
from mspray.ray.serve.app import deployment_options
from mspray.ray.serve.slots import apply_user_config
from mspray.ray.serve.verify import (
    VerifyError,
    reachable,
    verify_replicas,
    verify_through_dashboard,
)

log = logging.getLogger(__name__)

IMPORT_PATH = "mspray.ray.serve:build_app"
#: The Serve REST API's one resource (https://docs.ray.io/en/latest/serve/api/index.html).
API_PATH = "/api/serve/applications/"
#: What ``serve deploy`` assumes without an address: a head node on this machine.
LOCAL_DASHBOARD = "http://127.0.0.1:8265"
FAILED = ("DEPLOY_FAILED", "UNHEALTHY")
#: Options of a ``deployments:`` entry that override what ``args`` fields set: an override
#: flag for such a field would be silently ignored, so it is an error instead.
SHADOWED_BY = {
    "replicas": ("num_replicas", "autoscaling_config"),
    "max_replicas": ("num_replicas", "autoscaling_config"),
    "target_ongoing_requests": ("autoscaling_config",),
    "max_ongoing_requests": ("max_ongoing_requests",),
    "num_cpus": ("ray_actor_options",),  # replaced as a whole, not merged, by Serve
    "num_gpus": ("ray_actor_options",),
}


class DeployError(RuntimeError):
    """The config is invalid, the cluster unreachable, or the application did not come up."""


# ---------------------------------------------------------------------------- config
def load_config(path: str) -> dict[str, Any]:
    """The Serve config file (YAML) as a dict."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise DeployError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise DeployError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not data.get("applications"):
        raise DeployError(f"{path}: not a Serve config with an 'applications' list")
    return data


def apply_overrides(
    config: dict[str, Any],
    overrides: dict[str, Any],
    *,
    app: str | None = None,
    http_host: str | None = None,
    http_port: int | None = None,
) -> dict[str, Any]:
    """A copy of ``config`` with :class:`ServeConfig` ``overrides`` (field -> value) on the
    mspray application: reloadable fields into the detector's ``user_config``, the others
    into the application's ``args``."""
    config = copy.deepcopy(config)
    target = _mspray_app(config, app)
    dep = _detector(target, create=True)
    for key, value in overrides.items():
        if key not in ServeConfig.model_fields:
            raise DeployError(f"{key}: not a ServeConfig field")
        if key == "request_timeout_s":  # a setting of the proxies, not of the application
            config.setdefault("http_options", {})[key] = value
            continue
        if key in ServeConfig.RELOADABLE:
            dep.setdefault("user_config", {})[key] = value
            continue
        shadowing = [o for o in SHADOWED_BY.get(key, ()) if o in dep]
        if shadowing:
            raise DeployError(
                f"{key}: the config's deployments[{DEPLOYMENT}] sets {shadowing[0]}, which "
                f"overrides args.{key}: change it there, or move it to args"
            )
        target.setdefault("args", {})[key] = value
    http = config.setdefault("http_options", {})
    if http_host:
        http["host"] = http_host
    if http_port:
        http["port"] = http_port
    return config


def check_config(config: dict[str, Any], check_bundle: bool = True) -> dict[str, ServeConfig]:
    """Validate ``config`` with Ray's Serve schema and each mspray application's settings
    (``args`` + the detector's ``user_config``); with ``check_bundle`` also that each bundle
    is complete. Returns the effective settings per mspray application name."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        raise DeployError(f"invalid Serve config: {e}") from None
    settings = {}
    for app in config["applications"]:
        if app.get("import_path") != IMPORT_PATH:
            continue  # not ours: Serve checks it
        name = app.get("name", "default")
        dep = _detector(app, create=False) or {}
        user = dep.get("user_config") or {}
        try:
            # The effective settings: args, the user_config on top, and a deployments-level
            # max_ongoing_requests, which Serve applies over what args set.
            args = dict(app.get("args") or {})
            if "max_ongoing_requests" in dep:
                args["max_ongoing_requests"] = dep["max_ongoing_requests"]
            cfg = apply_user_config(validate(ServeConfig, args, "args"), user)
            deployment_options(cfg)
        except ConfigError as e:
            raise DeployError(f"application {name!r}: {e}") from None
        if not cfg.named_models():
            raise DeployError(f"application {name!r}: no bundle (--bundle or user_config)")
        if check_bundle:
            # A root is pinned to the version its `latest` names now: every replica (also
            # ones autoscaling starts later) loads that version, and redeploying a root after
            # `build-bank` moved its pointer changes user_config, which swaps in place.
            from mspray.artifacts.bundle import BundleError, resolve_bundle

            pinned: dict[str, str] = {}
            for model, uri in cfg.named_models().items():
                try:
                    pinned[model] = resolve_bundle(uri)
                except (BundleError, OSError) as e:
                    raise DeployError(f"application {name!r}, model {model!r}: {e}") from None
            update: dict[str, Any] = {}
            if cfg.bundle_uri:
                update["bundle_uri"] = pinned[ServeConfig.DEFAULT_MODEL]
            if cfg.models:
                update["models"] = {m: pinned[m] for m in cfg.models}
            if update != {k: getattr(cfg, k) for k in update}:
                log.info("bundles pinned to their current versions: %s", update)
                _detector(app, create=True).setdefault("user_config", {}).update(update)
                cfg = cfg.model_copy(update=update)
        settings[name] = cfg
    if not settings:
        raise DeployError(f"no application with import_path {IMPORT_PATH} in the config")
    return settings


def _mspray_app(config: dict[str, Any], name: str | None) -> dict[str, Any]:
    apps = config["applications"]
    if name:
        found = [a for a in apps if a.get("name") == name]
        if not found:
            raise DeployError(f"no application named {name!r} in the config")
        return found[0]
    ours = [a for a in apps if a.get("import_path") == IMPORT_PATH]
    if len(ours) != 1:
        raise DeployError(f"{len(ours)} applications use {IMPORT_PATH}: choose one with --app")
    return ours[0]


def _detector(app: dict[str, Any], create: bool) -> dict[str, Any] | None:
    deps = app.setdefault("deployments", []) if create else app.get("deployments") or []
    dep = next((d for d in deps if d.get("name") == DEPLOYMENT), None)
    if dep is None and create:
        dep = {"name": DEPLOYMENT}
        deps.append(dep)
    return dep


# ---------------------------------------------------------------------------- REST API
def dashboard_url(address: str | None = None) -> str:
    """The dashboard URL to deploy through (see the module docstring for the order)."""
    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS")
    if address and "://" in address and not address.startswith("ray://"):
        return address.rstrip("/")
    if not (address or os.environ.get("RAY_ADDRESS")):
        return LOCAL_DASHBOARD
    # A Ray address (e.g. inside `ray job submit`): join the cluster, ask for its dashboard.
    from mspray.config.run import use_run
    from mspray.ray.runtime import ray_dashboard_url

    with use_run(address=address):
        url = ray_dashboard_url()
    if not url:
        raise DeployError("this Ray cluster runs without a dashboard (the Serve REST API)")
    return url if "://" in url else f"http://{url}"


def auth_headers() -> dict[str, str]:
    """What Ray's own dashboard clients (``ray job submit``, ``serve deploy``) send to
    authenticate: with token authentication on here (``RAY_AUTH_MODE=token``), the
    cluster's token as a bearer header, taken from ``RAY_AUTH_TOKEN``, else the file
    ``RAY_AUTH_TOKEN_PATH`` names, else ``~/.ray/auth_token``; else nothing. (Ray's helper
    for this is private; tests/ray/serve/test_serve_deploy_auth.py checks both agree.)"""
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        try:
            with open(path) as f:
                token = f.read().strip()
        except OSError:
            token = ""
    if not token:
        raise DeployError(
            "token authentication is on here (RAY_AUTH_MODE=token) but no token was found: "
            "set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, or write it to "
            "~/.ray/auth_token (as for `ray job submit`)"
        )
    return {"Authorization": f"Bearer {token}"}


def rest(method: str, url: str, body: Any = None, timeout: float = 60.0) -> Any:
    """One Serve REST API call, authenticated like Ray's clients (:func:`auth_headers`);
    the JSON answer (None if empty), or :class:`DeployError` with the server's message."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + API_PATH, data=data, method=method, headers=auth_headers())
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace").strip()
        if e.code in (401, 403):
            detail += (
                " (the cluster uses token authentication: set RAY_AUTH_MODE=token and the "
                "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token, as for `ray job submit`)"
            )
        raise DeployError(f"{method} {url}{API_PATH}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DeployError(
            f"cannot reach the Ray dashboard at {url} ({reason}): pass --address or set "
            "RAY_DASHBOARD_ADDRESS (for a local endpoint without a cluster: mspray serve)"
        ) from None
    return json.loads(text) if text.strip() else None


def applications(url: str) -> dict[str, dict[str, Any]]:
    """``GET /api/serve/applications/``: name -> application details."""
    return (rest("GET", url) or {}).get("applications") or {}


def wait_running(
    url: str,
    names: list[str],
    timeout: float,
    since: dict[str, float | None],
    poll_s: float = 2.0,
) -> dict[str, dict[str, Any]]:
    """Poll until every application in ``names`` is RUNNING under the config deployed
    after ``since`` (name -> its previous ``last_deployed_time_s``). A failed application
    raises :class:`DeployError` with its and its deployments' messages."""
    deadline = time.monotonic() + timeout
    while True:
        # First wait one interval: right after the PUT an updated application still shows
        # the RUNNING of its old config until the controller's next loop marks it UPDATING.
        time.sleep(poll_s)
        apps = applications(url)
        states = {n: apps.get(n, {}).get("status", "NOT_STARTED") for n in names}
        failed = [n for n, s in states.items() if s in FAILED]
        if failed:
            raise DeployError("; ".join(_failure(n, apps[n]) for n in failed))
        fresh = all(apps.get(n, {}).get("last_deployed_time_s") != since.get(n) for n in names)
        if fresh and all(s == "RUNNING" for s in states.values()):
            return {n: apps[n] for n in names}
        if time.monotonic() > deadline:
            detail = "; ".join(_failure(n, apps.get(n, {})) for n in names)
            raise DeployError(f"not RUNNING after {timeout:.0f}s: {detail}")


def _failure(name: str, app: dict[str, Any]) -> str:
    parts = [f"{name}: {app.get('status', 'NOT_STARTED')}"]
    if app.get("message"):
        parts.append(str(app["message"]).strip())
    for dep_name, dep in (app.get("deployments") or {}).items():
        if dep.get("message"):
            parts.append(f"{dep_name} {dep.get('status')}: {str(dep['message']).strip()}")
    return " | ".join(parts)


def running_replicas(app: dict[str, Any]) -> list[str]:
    """Ids of the RUNNING replicas of the detector deployment in an application's REST
    details."""
    dep = (app.get("deployments") or {}).get(DEPLOYMENT) or {}
    return [r["replica_id"] for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]


def endpoint_url(config: dict[str, Any], dashboard: str, route_prefix: str | None) -> str:
    """Where the application answers HTTP: the proxy of the dashboard's host (or of this
    machine) at the config's port, under the application's route prefix."""
    from urllib.parse import urlsplit

    http = config.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    if host in ("0.0.0.0", "::"):
        host = urlsplit(dashboard).hostname or "127.0.0.1"
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{http.get('port', 8000)}{(route_prefix or '/').rstrip('/')}"


def head_endpoint_url(config: dict[str, Any], route_prefix: str | None) -> str:
    """Where the application answers HTTP as seen from the head node (its own proxy)."""
    http = config.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    if host in ("0.0.0.0", "::", "localhost"):
        host = "127.0.0.1"
    return f"http://{host}:{http.get('port', 8000)}{(route_prefix or '/').rstrip('/')}"


def confirm_rollout(
    config: dict[str, Any],
    dashboard: str,
    app: dict[str, Any],
    name: str,
    models: dict[str, str],
    timeout: float,
    http_address: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Confirm that every RUNNING replica of application ``name`` (its REST details
    ``app``) serves ``models``, through what this caller reaches: ``http_address`` (the
    proxy as the caller sees it, e.g. a load balancer or a port-forward of 8000) when given,
    else the proxy of the dashboard's host when a connection to it opens, else a job on the
    head node submitted through the dashboard (from outside the cluster, often the one
    port open). Raises :class:`DeployError`."""
    prefix = (app.get("route_prefix") or "/").rstrip("/")
    ids = running_replicas(app)
    n = len(ids)
    try:
        if http_address:
            url = http_address.rstrip("/") + prefix
            return verify_replicas(url, n, models, timeout, replica_ids=ids)
        endpoint = endpoint_url(config, dashboard, app.get("route_prefix"))
        if reachable(endpoint):
            return verify_replicas(endpoint, n, models, timeout, replica_ids=ids)
        log.info(
            "%s is not reachable from here: verifying the replicas through a job on the head "
            "node (pass --http-address to verify through another address)",
            endpoint,
        )
        spec = next((a for a in config["applications"] if a.get("name", "default") == name), {})
        return verify_through_dashboard(
            dashboard,
            head_endpoint_url(config, app.get("route_prefix")),
            n,
            models,
            timeout,
            runtime_env=spec.get("runtime_env"),
            replica_ids=ids,
        )
    except VerifyError as e:
        raise DeployError(str(e)) from None


def deploy(
    config: dict[str, Any],
    url: str,
    *,
    wait: bool = True,
    timeout: float = 600.0,
    settings: dict[str, ServeConfig] | None = None,
    http_address: str | None = None,
) -> dict[str, Any]:
    """Send ``config`` to the Serve REST API at ``url``; with ``wait``, return once every
    application in it is RUNNING and, for the mspray applications of ``settings``, every
    replica serves the requested bundle versions (a failed hot swap raises
    :class:`DeployError`; see :func:`confirm_rollout` for ``http_address``). Returns a
    summary (dashboard, application states, replicas checked)."""
    names = [a.get("name", "default") for a in config["applications"]]
    before = applications(url)
    since = {n: before.get(n, {}).get("last_deployed_time_s") for n in names}
    rest("PUT", url, config)
    result: dict[str, Any] = {"dashboard": url, "applications": names}
    if wait:
        apps = wait_running(url, names, timeout, since)
        checked = {}
        for name, cfg in (settings or {}).items():
            replicas = confirm_rollout(
                config, url, apps[name], name, cfg.named_models(), timeout, http_address
            )
            checked[name] = {r: h.get("loaded") for r, h in replicas.items()}
        result["replicas"] = checked
        http = config.get("http_options") or {}
        result.update(
            status={n: a.get("status") for n, a in apps.items()},
            route_prefix={n: a.get("route_prefix") for n, a in apps.items()},
            http=f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}",
        )
    return result
