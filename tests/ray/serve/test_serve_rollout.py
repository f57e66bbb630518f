"""Rollouts and overload on a real Serve over HTTP: a hot swap across 2 replicas loses no
request and is confirmed replica by replica; a failed swap keeps the old version serving and
is reported; a burst beyond the queue limit gets quick 503s instead of piling up."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from serve_util import deploy_apps, free_port

from mspray.artifacts.bundle import read_meta
from mspray.ray.serve.verify import VerifyError, verify_replicas

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]


def _config(port: int, bundle: str, **args) -> dict:
    raw = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    app = raw["applications"][0]
    app["args"].update(args)
    app["args"].pop("max_replicas", None)
    app["deployments"][0]["user_config"].update(bundle_uri=bundle)
    return raw


@pytest.fixture(scope="module")
def serve_port(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def _image(synthetic_root) -> bytes:
    return sorted((Path(synthetic_root) / "synthetic" / "test" / "good").glob("*.png"))[
        0
    ].read_bytes()


def test_rollout_is_confirmed_per_replica_and_a_failed_swap_is_reported(
    serve_port, bundles, synthetic_root
):
    url = f"http://127.0.0.1:{serve_port}"
    deploy_apps(_config(serve_port, bundles["a"], replicas=2), blocking=True)
    # both replicas up on "a" (also the check deploy.py runs after RUNNING)
    verify_replicas(url, 2, {"default": bundles["a"]}, timeout=120)

    image, results, stop = _image(synthetic_root), [], threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/predict", content=image, headers={"content-type": "image/png"})
                results.append((r.status_code, r.json().get("model_version")))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for t in clients:
        t.start()
    try:
        deploy_apps(_config(serve_port, bundles["b"], replicas=2), blocking=False)
        swapped = verify_replicas(url, 2, {"default": bundles["b"]}, timeout=120)
        version_b = read_meta(bundles["b"])["version"]
        assert len(swapped) == 2
        assert [h["loaded"] for h in swapped.values()] == [{"default": version_b}] * 2

        deploy_apps(_config(serve_port, bundles["bad"], replicas=2), blocking=False)
        with pytest.raises(VerifyError, match="failed to swap") as failed:
            verify_replicas(url, 2, {"default": bundles["bad"]}, timeout=120)
        assert version_b in str(failed.value)  # names the version that still serves
        n_before = len(results)
        deadline = time.time() + 30
        while len(results) < n_before + 5 and time.time() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert results and all(code == 200 for code, _ in results), "a request failed"
    # after the failed swap the replicas answer with "b", never with the broken bundle
    assert {v for _, v in results[n_before:]} == {version_b}
    health = httpx.get(f"{url}/healthz", timeout=30).json()
    assert health["status"] == "degraded" and health["model_version"] == version_b


def test_a_burst_beyond_the_queue_gets_quick_503s(serve_port, bundles, synthetic_root):
    """One replica taking one request at a time and a queue of one: of a burst of 16, the
    ones that cannot even queue are refused with a 503 instead of waiting in memory."""
    from ray import serve

    url = f"http://127.0.0.1:{serve_port}/overload"
    raw = _config(
        serve_port,
        bundles["a"],
        replicas=1,
        max_batch_size=1,
        max_ongoing_requests=1,
        max_queued_requests=1,
    )
    app = raw["applications"][0]
    app.update(name="overload", route_prefix="/overload")
    app["deployments"][0]["user_config"]["max_batch_size"] = 1
    serve.delete("mspray")  # the rollout test's replicas: free their CPUs
    deploy_apps(raw, blocking=False)
    verify_replicas(url, 1, {"default": bundles["a"]}, timeout=300)
    image = _image(synthetic_root)

    def one(_: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        r = httpx.post(
            f"{url}/v1/predict", content=image, headers={"content-type": "image/png"}, timeout=120
        )
        return r.status_code, time.perf_counter() - t0

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    codes = [c for c, _ in answers]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0 and codes.count(200) >= 2, codes
    rejected = sorted(s for c, s in answers if c == 503)
    print(f"503 x{len(rejected)}: median {rejected[len(rejected) // 2] * 1000:.0f} ms")


class OneReplicaProxy:
    """Serve's locality routing at its extreme (the proxy of a zone where one replica runs):
    forwards each GET to the real proxy and lets through only answers of the first replica
    it saw."""

    def __init__(self, target: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self
        self.replica: str | None = None

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                for _ in range(200):
                    r = httpx.get(target + self.path, timeout=30)
                    replica = r.json().get("replica")
                    outer.replica = outer.replica or replica
                    if replica == outer.replica:
                        break
                else:
                    r = httpx.Response(503, content=b"{}")
                self.send_response(r.status_code)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(r.content)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_every_replica_is_verified_through_a_proxy_that_reaches_one(serve_port, bundles):
    """Locality routing cannot hide a replica: one reachable replica answers for all."""
    url = f"http://127.0.0.1:{serve_port}"
    deploy_apps(_config(serve_port, bundles["a"], replicas=2), blocking=True)
    proxy = OneReplicaProxy(url)
    try:
        confirmed = verify_replicas(proxy.url, 2, {"default": bundles["a"]}, timeout=30)
        answers = {httpx.get(f"{proxy.url}/healthz", timeout=30).json()["replica"] for _ in "ab"}
    finally:
        proxy.close()
    assert len(answers) == 1  # the proxy never let the other replica answer
    assert len(confirmed) == 2 and answers < set(confirmed)
    version = read_meta(bundles["a"])["version"]
    assert [h["loaded"] for h in confirmed.values()] == [{"default": version}] * 2
