"""Replicas over their lifetime on a real Serve over HTTP: a bundle root serves one version
per deploy on every replica (also one started again later) until the next deploy, and a
replica whose model calls fail for good (a dead CUDA context, injected by
``serve_faults.py``) fails its health check and is replaced."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
import yaml
from serve_faults import FAULT_FILE
from serve_util import deploy_apps, free_port

from mspray.artifacts.bundle import load_bundle, read_meta, save_bundle
from mspray.ray.serve.verify import VerifyError, verify_replicas

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent


def _config(port: int, bundle: str, **args) -> dict:
    """serve_config.yaml with ``bundle``, a fixed replica count and a 1 s health check."""
    raw = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    app = raw["applications"][0]
    app["args"].update(args)
    app["args"].pop("max_replicas", None)
    dep = app["deployments"][0]
    dep["user_config"].update(bundle_uri=bundle, device="cpu")
    dep.update(health_check_period_s=1, health_check_timeout_s=10)
    return raw


def _replicas(app: str) -> dict[str, str]:
    """Replica id -> state of the detector deployment of ``app`` (Serve's own view)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    dep = details["applications"][app]["deployments"]["MSPrayDetector"]
    return {r["replica_id"]: r["state"] for r in dep["replicas"]}


def _versions(url: str, n: int, timeout: float = 90) -> dict[str, str]:
    """Replica id -> the version it has loaded, once ``n`` healthy replicas answered."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < n:
        assert time.monotonic() < deadline, f"{len(seen)} of {n} replicas answered: {seen}"
        try:
            health = httpx.get(f"{url}/healthz", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            continue
        if health.get("status") == "ok" and health.get("loaded"):
            seen[health["replica"]] = health["loaded"]["default"]
        time.sleep(0.05)
    return seen


@pytest.fixture(scope="module")
def serve_port(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def test_a_root_serves_one_version_per_deploy(ray_local, serve_port, bundles, tmp_path):
    """Two replicas on a root; then a new version becomes `latest`. A replica started again
    (as after a node loss) serves the version of the running deploy, like its peer, and a
    rollout check against the root does not confirm it; deploying the same file again
    moves every replica to the new version."""
    root = tmp_path / "root"
    shutil.copytree(bundles["a"], root)
    version_a, version_b = read_meta(bundles["a"])["version"], read_meta(bundles["b"])["version"]
    url = f"http://127.0.0.1:{serve_port}"
    raw = _config(serve_port, str(root), replicas=2)
    deploy_apps(raw, blocking=True)
    assert set(_versions(url, 2).values()) == {version_a}

    save_bundle(load_bundle(bundles["b"]), str(root))  # `latest` now names b's version
    assert read_meta(str(root))["version"] == version_b
    with pytest.raises(VerifyError, match="1 replicas|0 of 2|replicas serve"):
        verify_replicas(url, 2, {"default": str(root)}, timeout=3)

    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    lost = details["applications"]["mspray"]["deployments"]["MSPrayDetector"]["replicas"][0]
    ray_local.kill(ray_local.get_actor(lost["actor_name"], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    while True:
        states = _replicas("mspray")
        if lost["replica_id"] not in states and list(states.values()) == ["RUNNING"] * 2:
            break
        assert time.monotonic() < deadline, f"no replacement replica: {states}"
        time.sleep(0.5)
    after = _versions(url, 2)
    assert set(after) == set(states) and set(after.values()) == {version_a}, after

    deploy_apps(raw, blocking=False)  # the same file again
    confirmed = verify_replicas(url, 2, {"default": str(root)}, timeout=90)
    assert [h["loaded"] for h in confirmed.values()] == [{"default": version_b}] * 2


def test_a_replica_whose_model_calls_fail_is_replaced(ray_local, serve_port, bundles, tmp_path):
    """Every model call of the replica fails (an injected CUDA error): its health check,
    a small prediction, fails and Serve replaces it; the new replica serves."""
    from ray import serve

    flag = tmp_path / "gpu-broken"
    raw = _config(serve_port, bundles["a"], replicas=1)
    app = raw["applications"][0]
    pythonpath = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    app.update(
        name="faulty",
        route_prefix="/faulty",
        import_path="serve_faults:build_app",
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, FAULT_FILE: str(flag)}},
    )
    serve.delete("mspray")  # the other test's replicas: free their CPUs
    deploy_apps(raw, blocking=True)
    url = f"http://127.0.0.1:{serve_port}/faulty"
    image = _png_of(bundles["a"])
    first = httpx.get(f"{url}/healthz", timeout=30).json()["replica"]
    assert _predict(url, image).status_code == 200

    flag.touch()  # the "GPU" fails from now on
    assert _predict(url, image).status_code == 500
    deadline = time.monotonic() + 90
    while _replicas("faulty").get(first) == "RUNNING":
        assert time.monotonic() < deadline, "the failing replica was never replaced"
        time.sleep(0.5)
    flag.unlink()  # a healthy device for the replacement

    deadline = time.monotonic() + 120
    while True:
        try:
            health = httpx.get(f"{url}/healthz", timeout=10)
            if health.status_code == 200 and health.json()["replica"] != first:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "no replacement replica came up"
        time.sleep(0.5)
    r = _predict(url, image)
    assert r.status_code == 200 and r.json()["model_version"] == read_meta(bundles["a"])["version"]


def _png_of(bundle: str) -> bytes:
    """A small PNG image of the bundle's input size."""
    import io

    import numpy as np
    from PIL import Image

    size = load_bundle(bundle, with_banks=False).cfg.model.image_size
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _predict(url: str, image: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/predict", content=image, headers={"content-type": "image/png"}, timeout=60
    )
