"""``mspray serve``: the detector endpoint on a local Ray (or a cluster) until Ctrl-C/SIGTERM.

The command line (:mod:`mspray.cli`) derives its flags from :class:`~mspray.config.ServeConfig`
and calls :func:`serve_forever`; for a cluster and zero-downtime model swaps use
serve_config.yaml with ``ray_jobs/deploy.py`` (:mod:`mspray.ray.serve.deploy`) instead.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import Any

from mspray.config import ServeConfig

log = logging.getLogger("mspray")

#: Name of this command's Serve application. Not serve_config.yaml's production name
#: ``mspray``: on a shared cluster (``--address``), starting or stopping ``mspray serve``
#: must never replace or delete that application.
APP_NAME = "mspray-serve"


def endpoint_urls(
    host: str, port: int, bundle: str | None, models: dict[str, str] | None = None
) -> dict[str, Any]:
    """The URLs a client uses (a wildcard listen address is reached through loopback)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{host}:{port}"
    out = {
        "url": url,
        "predict": f"{url}/v1/predict",
        "model": f"{url}/v1/model",
        "models": f"{url}/v1/models",
        "bundle": bundle,
    }
    if models:
        out["named_models"] = dict(models)
    return out


def serve_forever(
    cfg: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    stop: threading.Event | None = None,
) -> int:
    """Run the endpoint for ``cfg`` until Ctrl-C, SIGTERM or ``stop`` is set; then remove it.

    Prints the URLs as JSON once the deployment is up. Returns the exit code: 0, or 2 when
    the bundle is not there or the deployment did not start. On a Ray this call
    started, Serve and Ray are shut down at the end; on a shared one only the application
    is deleted.
    """
    import ray
    from ray import serve

    from mspray.artifacts.bundle import BundleError, resolve_bundle
    from mspray.config.run import use_run
    from mspray.ray.runtime import init_ray
    from mspray.ray.serve.app import build_app

    # A typo fails here, not after Serve's replica retries; and a root is pinned to its
    # current version, so replicas started later load the same model. Without a bundle,
    # user_config must bring it (Serve reports that).
    pinned: dict[str, str] = {}
    for name, uri in cfg.named_models().items():
        try:
            pinned[name] = resolve_bundle(uri)
        except (BundleError, OSError) as e:
            print(f"mspray serve: error: model {name!r}: {e}", file=sys.stderr)
            return 2
    update: dict = {"models": {m: pinned[m] for m in cfg.models}}
    if cfg.bundle_uri:
        update["bundle_uri"] = pinned[cfg.DEFAULT_MODEL]
    cfg = cfg.model_copy(update=update)
    app = build_app(cfg)  # validate the settings before starting anything
    with use_run(progress=False):  # Serve has no Ray Data stages to show
        started = init_ray()
    stop = stop or threading.Event()

    def cleanup() -> None:
        if started:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)

    serve.start(
        http_options={"host": host, "port": port, "request_timeout_s": cfg.request_timeout_s}
    )
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except Exception as e:  # e.g. a bundle that cannot be loaded fails the replicas
        print(f"mspray serve: error: the deployment did not start: {e}", file=sys.stderr)
        cleanup()
        return 2
    urls = endpoint_urls(host, port, cfg.bundle_uri, cfg.models)
    print(json.dumps(urls, indent=2), flush=True)
    log.info("serving %s at %s; Ctrl-C to stop", cfg.named_models(), urls["url"])
    previous = _on_sigterm(stop.set)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        log.info("stopping")
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        cleanup()
    return 0


def _on_sigterm(handler: Any) -> Any:
    """Make SIGTERM call ``handler`` (main thread only, where Python handles signals);
    returns the previous handler, or None when it could not be installed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda *_: handler())
