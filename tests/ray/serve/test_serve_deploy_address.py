"""``mspray deploy`` from outside the cluster, where only the dashboard is forwarded (as
with ``kubectl port-forward`` of 8265): the rollout is still confirmed replica by replica,
through a job the dashboard runs on the head node, instead of waiting for a proxy port the
caller cannot reach.

The caller reaches the private cluster's dashboard only through a forwarder on ``[::1]``;
Serve's proxy listens on IPv4 (``0.0.0.0``), so the proxy port at the dashboard's address
is closed to the caller, as it is from outside a real cluster.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from serve_util import free_port
from test_jobs_e2e import ray_cluster  # noqa: F401  # a private head with the dashboard

from mspray.artifacts.bundle import read_meta
from mspray.ray.serve.deploy import apply_overrides, check_config, deploy, endpoint_url
from mspray.ray.serve.deploy import load_config as load_serve_config
from mspray.ray.serve.verify import reachable

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class Forwarder:
    """A TCP port-forward from ``[::1]:port`` to ``127.0.0.1:target``."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.bind(("::1", 0))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def test_deploy_is_confirmed_through_the_dashboard(ray_cluster, tiny_bundle):  # noqa: F811
    forward = Forwarder(urlsplit(ray_cluster.dashboard_url).port)
    try:
        dashboard = f"http://[::1]:{forward.port}"  # all the caller reaches
        overrides = {"bundle_uri": tiny_bundle[0], "device": "cpu", "num_cpus": 1.0,
                     "replicas": 1, "max_replicas": 1}  # fmt: skip
        config = apply_overrides(
            load_serve_config(str(REPO / "serve_config.yaml")), overrides, http_port=free_port()
        )
        assert config["http_options"]["host"] == "0.0.0.0"  # as shipped
        assert not reachable(endpoint_url(config, dashboard, "/"))
        result = deploy(config, dashboard, timeout=150, settings=check_config(config))
    finally:
        forward.close()
    assert result["status"] == {"mspray": "RUNNING"}
    (loaded,) = result["replicas"]["mspray"].values()
    assert loaded == {"default": read_meta(tiny_bundle[0])["version"]}
