"""The Serve endpoint over real HTTP on a local Ray: scores equal the core's, concurrent
requests are batched, bad input gets its 4xx, and a new bundle URI in user_config swaps the
model with no failed request.

The app is deployed the way ``serve run serve_config.yaml`` does it (the repository's own
config, with the test bundle and one replica filled in), so these tests exercise the
shipped config and the declarative update path that ``serve deploy`` uses.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from serve_util import deploy_apps, free_port

from mspray.artifacts.bundle import load_bundle
from mspray.data.images import decode_image, to_tensor

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[3]
APP = "mspray"
#: A small body limit, so the 413 test need not send megabytes.
MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def images(synthetic_root) -> dict[str, bytes]:
    """A normal and a defective test image, as PNG bytes."""
    test = Path(synthetic_root) / "synthetic" / "test"
    good = sorted((test / "good").glob("*.png"))[0]
    bad = sorted(p for p in test.glob("*/*.png") if p.parent.name != "good")[0]
    return {"good": good.read_bytes(), "defect": bad.read_bytes()}


def _config(port: int, bundle: str) -> dict:
    """serve_config.yaml as shipped, with the test bundle, loopback and one fixed replica."""
    raw = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    app = raw["applications"][0]
    app["args"].update(replicas=1)
    del app["args"]["max_replicas"]
    app["deployments"][0]["user_config"].update(bundle_uri=bundle, max_image_bytes=MAX_BYTES)
    return raw


class Endpoint:
    def __init__(self, url: str, port: int):
        self.url, self.port = url, port
        self.replica = ""  # set once the app is up: the one replica's id
        self.client = httpx.Client(base_url=url, timeout=60)

    def predict(self, data: bytes, ctype: str = "image/png", **kw) -> httpx.Response:
        return self.client.post("/v1/predict", content=data, headers={"content-type": ctype}, **kw)

    def stats(self) -> dict:
        return self.client.get("/v1/stats").json()

    def model(self) -> dict:
        return self.client.get("/v1/model").json()


@pytest.fixture(scope="module")
def endpoint(ray_local, bundles):
    """The app from serve_config.yaml on bundle "a", behind Serve's proxy on loopback."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy_apps(_config(port, bundles["a"]), blocking=True)
    ep = Endpoint(f"http://127.0.0.1:{port}", port)
    deadline = time.time() + 60
    while ep.client.get("/healthz").status_code != 200:
        assert time.time() < deadline, "endpoint did not become healthy"
        time.sleep(0.5)
    ep.replica = ep.stats()["replica"]
    yield ep
    ep.client.close()
    serve.delete(APP)
    serve.shutdown()  # frees the port and the replica's CPU for later Ray tests


def _core_prediction(bundle: str, data: bytes):
    det = load_bundle(bundle)
    arr = decode_image(data, "test", det.cfg.score.max_image_pixels)
    return det, det.predict(to_tensor(arr, det.cfg.model.image_size)[None])


# ---------------------------------------------------------------------------- predictions
@pytest.mark.parametrize("which", ["good", "defect"])
def test_prediction_equals_core_score(endpoint, bundles, images, which):
    det, expected = _core_prediction(bundles["a"], images[which])
    raw = endpoint.predict(images[which])
    multipart = endpoint.client.post(
        "/v1/predict", files={"file": (f"{which}.png", images[which], "image/png")}
    )
    for r in (raw, multipart):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["image_score"] == pytest.approx(float(expected.image_scores[0]), rel=1e-4)
        assert body["is_anomalous"] == bool(expected.is_anomalous[0])
        assert body["threshold"] == pytest.approx(det.threshold)
        assert body["model_version"] == det.version
        assert "anomaly_map_png" not in body


def test_map_is_a_png_with_per_scale_scores(endpoint, bundles, images):
    det, expected = _core_prediction(bundles["a"], images["defect"])
    r = endpoint.predict(images["defect"], params={"map": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    png = Image.open(io.BytesIO(base64.b64decode(body["anomaly_map_png"])))
    assert png.format == "PNG" and png.size == (64, 64) and png.mode == "RGB"
    assert set(body["scale_scores"]) == {"32", "16"}
    for s, v in body["scale_scores"].items():
        assert v == pytest.approx(float(expected.scale_scores[int(s)][0]), rel=1e-4)
    lo, hi = body["map_range"]
    assert lo < hi


def test_model_info(endpoint, bundles):
    det = load_bundle(bundles["a"])
    info = endpoint.model()
    assert info["model_version"] == det.version
    assert info["bundle_uri"] == bundles["a"]
    assert info["scales"] == [32, 16]
    assert info["bank_sizes"] == {str(s): b.ntotal for s, b in det.banks.items()}
    assert info["config"] == json.loads(det.cfg.to_json())
    assert info["limits"]["max_image_bytes"] == MAX_BYTES
    # the replica's ServeConfig: args of the config file with its user_config on top
    assert info["serving"]["replicas"] == 1 and info["serving"]["max_replicas"] is None
    assert info["serving"]["max_image_bytes"] == MAX_BYTES
    # the false-alarm rate the threshold promises, as recorded in meta.json
    assert info["calibration"] == det.meta["calibration"]
    assert info["calibration"]["threshold"] == pytest.approx(det.threshold)
    assert endpoint.client.get("/healthz").json()["model_version"] == det.version


def _batching(endpoint: Endpoint, bundle: str, **settings) -> None:
    """Apply batching ``settings`` through user_config (in place) and wait until served."""
    raw = _config(endpoint.port, bundle)
    raw["applications"][0]["deployments"][0]["user_config"].update(settings)
    deploy_apps(raw, blocking=True)
    deadline = time.time() + 60
    while any(endpoint.model()["serving"][k] != v for k, v in settings.items()):
        assert time.time() < deadline, "the batching settings were never applied"
        time.sleep(0.2)


def test_concurrent_requests_are_batched(endpoint, bundles, images):
    """Rounds of 4 requests released together into batches of at most 4 that wait up to
    2 s to fill: each round shares one forward pass however slowly the requests arrive
    (no 20 ms window to hit), and scores equal in any batch."""
    n_clients, rounds = 4, 3
    _batching(endpoint, bundles["a"], max_batch_size=n_clients, batch_wait_timeout_s=2.0)
    try:
        before = endpoint.stats()
        barrier = threading.Barrier(n_clients)

        def client(_: int) -> list[httpx.Response]:
            out = []
            with httpx.Client(base_url=endpoint.url, timeout=60) as c:
                for _ in range(rounds):
                    barrier.wait()  # a round starts when every client is done with the last
                    out.append(
                        c.post(
                            "/v1/predict",
                            content=images["good"],
                            headers={"content-type": "image/png"},
                        )
                    )
            return out

        with ThreadPoolExecutor(n_clients) as pool:
            responses = [r for rs in pool.map(client, range(n_clients)) for r in rs]
        after = endpoint.stats()
    finally:
        _batching(endpoint, bundles["a"], max_batch_size=16, batch_wait_timeout_s=0.02)
    assert len(responses) == n_clients * rounds
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    scores = {round(r.json()["image_score"], 4) for r in responses}
    assert len(scores) == 1  # the same image scores the same in any batch
    assert max(r.json()["batch_size"] for r in responses) == n_clients
    assert after["predictions"] - before["predictions"] == n_clients * rounds
    executed = {
        int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()
    }
    assert sum(k * v for k, v in executed.items()) == n_clients * rounds
    assert executed.get(n_clients, 0) >= 1, executed


# ---------------------------------------------------------------------------- bad input
def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _bad_inputs(images: dict[str, bytes]) -> dict[str, tuple[dict, int, str]]:
    """name -> (httpx request kwargs, expected status, fragment of the error message)."""
    good = images["good"]
    png = {"content-type": "image/png"}
    boundary = "mspraytestboundary"
    form = {"content-type": f"multipart/form-data; boundary={boundary}"}
    no_file = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    return {
        "empty body": ({"content": b"", "headers": png}, 400, "empty"),
        "not an image": ({"content": b"hello, world " * 10, "headers": png}, 422, "decode"),
        "truncated file": ({"content": good[: len(good) // 2], "headers": png}, 422, "truncated"),
        "json content type": (
            {"content": b'{"image": "x"}', "headers": {"content-type": "application/json"}},
            415,
            "content type",
        ),
        "text content type": (
            {"content": good, "headers": {"content-type": "text/plain"}},
            415,
            "content type",
        ),
        "body over the size limit": (
            {"content": b"\0" * (MAX_BYTES + 1), "headers": png},
            413,
            "limit",
        ),
        "chunked body over the size limit": (
            {"content": iter([b"\0" * 50_000] * 5), "headers": png},
            413,
            "limit",
        ),
        "decompression bomb": (
            {"content": _png(Image.new("1", (8000, 8000))), "headers": png},
            413,
            "pixels",
        ),
        "unsupported mode": (
            {
                "content": _png(Image.new("F", (8, 8)), "TIFF"),
                "headers": {"content-type": "image/tiff"},
            },
            415,
            "mode",
        ),
        "multipart without a file": ({"content": no_file, "headers": form}, 400, "file"),
        "multipart without boundary": (
            {"content": no_file, "headers": {"content-type": "multipart/form-data"}},
            400,
            "boundary",
        ),
        "multipart file not an image": (
            {"files": {"file": ("notes.png", b"not a png", "image/png")}},
            422,
            "notes.png",
        ),
        "invalid map flag": (
            {"content": good, "headers": png, "params": {"map": "perhaps"}},
            422,
            "map",
        ),
    }


BAD_NAMES = list(_bad_inputs({"good": b"x"}))


@pytest.mark.parametrize("case", BAD_NAMES)
def test_bad_input_gets_a_clear_4xx(endpoint, images, case):
    kwargs, status, fragment = _bad_inputs(images)[case]
    r = endpoint.client.post("/v1/predict", **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert fragment in r.json()["error"]


def test_replica_survives_bad_input(endpoint, images):
    stats = endpoint.stats()
    assert stats["replica"] == endpoint.replica  # the same replica: none crashed
    rejected = sum(stats["rejections"].values())
    assert rejected >= len(BAD_NAMES) - 1  # all but the query-parameter one are counted here
    assert endpoint.predict(images["good"]).status_code == 200


# ---------------------------------------------------------------------------- model swap
def test_reconfigure_swaps_model_without_failed_requests(endpoint, bundles, images):
    version_a = load_bundle(bundles["a"], with_banks=False).version
    det_b, expected_b = _core_prediction(bundles["b"], images["good"])
    assert det_b.version != version_a
    assert endpoint.model()["model_version"] == version_a

    stop = threading.Event()
    seen: list[list[tuple[int, str | None]]] = [[] for _ in range(4)]

    def load(i: int) -> None:
        with httpx.Client(base_url=endpoint.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post(
                    "/v1/predict", content=images["good"], headers={"content-type": "image/png"}
                )
                version = r.json().get("model_version") if r.status_code == 200 else None
                seen[i].append((r.status_code, version))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(seen))]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        deploy_apps(
            _config(endpoint.port, bundles["b"]), blocking=False
        )  # only user_config changed
        deadline = time.time() + 90
        while endpoint.model()["model_version"] != det_b.version:
            assert time.time() < deadline, "the new bundle was never served"
            time.sleep(0.2)
        time.sleep(1.0)  # keep the load on for a while after the swap
    finally:
        stop.set()
        for t in threads:
            t.join()

    results = [x for per_thread in seen for x in per_thread]
    assert results and all(status == 200 for status, _ in results), results
    assert {v for _, v in results} == {version_a, det_b.version}
    for per_thread in seen:  # once a client saw the new model, it never saw the old one again
        versions = [v for _, v in per_thread]
        first_b = versions.index(det_b.version)
        assert set(versions[first_b:]) == {det_b.version}
    assert endpoint.stats()["replica"] == endpoint.replica  # swapped in place, no restart
    body = endpoint.predict(images["good"]).json()
    assert body["image_score"] == pytest.approx(float(expected_b.image_scores[0]), rel=1e-4)


def test_unloadable_bundle_keeps_the_current_model(endpoint, bundles, images, tmp_path):
    version_b = load_bundle(bundles["b"], with_banks=False).version
    deploy_apps(_config(endpoint.port, str(tmp_path / "no-such-bundle")), blocking=False)
    deadline = time.time() + 60
    while not endpoint.model()["last_reload_error"]:
        assert time.time() < deadline, "the failed reload was never reported"
        time.sleep(0.2)
    info = endpoint.model()
    assert "no-such-bundle" in info["last_reload_error"]
    assert info["model_version"] == version_b
    r = endpoint.predict(images["good"])
    assert r.status_code == 200 and r.json()["model_version"] == version_b
    assert np.isfinite(r.json()["image_score"])
