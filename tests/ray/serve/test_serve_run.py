"""`mspray serve`: flags -> ServeConfig -> deployment options, and serve_forever() serving
real HTTP on the session's Ray until it is stopped, then removing the application."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from serve_util import free_port

from mspray.artifacts.bundle import resolve_bundle
from mspray.cli import build_parser
from mspray.cli.flags import serve_config_from_args
from mspray.config import ServeConfig
from mspray.ray.serve import deployment_options
from mspray.ray.serve.run import APP_NAME, endpoint_urls, serve_forever


def test_help_lists_routes_and_options(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("--bundle", "--port", "--host", "--replicas", "--max-batch-size"):
        assert text in out
    for text in ("/v1/predict", "Ctrl-C"):
        assert text in out


def test_flags_become_serve_config_and_deployment_options():
    argv = ["serve", "--bundle", "s3://m/b", "--port", "9000", "--max-batch-size", "8"]
    argv += ["--batch-wait-timeout-s", "0.005", "--num-gpus", "1"]
    args = build_parser().parse_args(argv)
    cfg = serve_config_from_args(args)
    assert (cfg.bundle_uri, cfg.max_batch_size, cfg.batch_wait_timeout_s) == ("s3://m/b", 8, 0.005)
    assert args.port == 9000
    opts = deployment_options(cfg)
    assert opts["num_replicas"] == 1 and opts["ray_actor_options"]["num_gpus"] == 1
    assert opts["user_config"]["max_batch_size"] == 8
    auto = serve_config_from_args(
        build_parser().parse_args(
            ["serve", "--bundle", "b", "--replicas", "2", "--max-replicas", "5"]
        )
    )
    scaling = deployment_options(auto)["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (2, 5)


def test_endpoint_urls_reach_a_wildcard_host_through_loopback():
    urls = endpoint_urls("0.0.0.0", 8123, "b")
    assert urls["predict"] == "http://127.0.0.1:8123/v1/predict" and urls["bundle"] == "b"


def test_missing_bundle_fails_before_starting_anything(tmp_path, capsys):
    cfg = ServeConfig(bundle=str(tmp_path / "nothing"))
    assert serve_forever(cfg, port=1, stop=threading.Event()) == 2
    assert "no such bundle" in capsys.readouterr().err


@pytest.fixture
def serve_down(ray_local):
    """Serve is shut down afterwards: serve_forever on a shared Ray only deletes its app,
    and a running Serve would keep this test's HTTP port for later tests."""
    yield
    from ray import serve

    serve.shutdown()


@pytest.mark.ray
def test_serve_forever_serves_until_stopped(serve_down, tiny_bundle, capsys):
    """On a Ray it did not start (as with --address), the endpoint is an application of its
    own: the production application ``mspray`` of serve_config.yaml is left as it was."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Production:
        def __call__(self, request) -> str:
            return "production"

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Production.bind(), name="mspray", route_prefix="/production")
    bundle = tiny_bundle[0]
    stop = threading.Event()
    result: list[int] = []
    cfg = ServeConfig(bundle=bundle, max_batch_size=4)
    runner = threading.Thread(
        target=lambda: result.append(serve_forever(cfg, port=port, stop=stop))
    )
    runner.start()
    try:
        deadline = time.monotonic() + 180
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            while True:
                assert runner.is_alive() and time.monotonic() < deadline, "never came up"
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            assert set(serve.status().applications) == {"mspray", APP_NAME}
            info = client.get("/v1/model").json()
            # a bundle root is served pinned to its current version
            assert info["bundle_uri"] == resolve_bundle(bundle)
            assert info["serving"]["max_batch_size"] == 4
            r = client.post(
                "/v1/predict", content=b"not an image", headers={"content-type": "image/png"}
            )
            assert r.status_code == 422
    finally:
        stop.set()
        runner.join(timeout=120)
    assert result == [0]
    printed = json.loads(capsys.readouterr().out)
    assert printed["predict"] == f"http://127.0.0.1:{port}/v1/predict"
    # removed on the way out; the production application still runs
    assert set(serve.status().applications) == {"mspray"}
    assert serve.status().applications["mspray"].status == "RUNNING"
