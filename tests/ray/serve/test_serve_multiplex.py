"""Several bundles behind one Serve deployment (model multiplexing), over real
HTTP on the session's Ray: each name scores like its own bundle, more names than the
replica's LRU holds rotate without errors, unknown names get 404 and broken bundles 503
while the others keep serving, requests for one model share a forward pass, and the
live metrics reach Ray's Prometheus endpoint.

The app is deployed from the repository's serve_config.yaml with ``user_config.models``
(the declarative path ``serve deploy`` uses).
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_util import deploy_apps, free_port

from mspray.artifacts.bundle import load_bundle, read_meta
from mspray.data.images import decode_image, to_tensor

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[3]

APP = "mspray"
LRU = 2  # max_num_models_per_replica: below the 3 loadable names


@pytest.fixture(scope="module")
def named(category_bundles, tmp_path_factory) -> dict[str, str]:
    """Served names -> bundle URIs: two categories, a copy of one under a third name (so
    three loadable models rotate through an LRU of two), and a broken bundle."""
    fabric, nut = category_bundles["fabric"][0], category_bundles["nut"][0]
    tmp = tmp_path_factory.mktemp("multiplex")
    copy = str(tmp / "fabric_copy")
    shutil.copytree(fabric, copy)
    broken = tmp / "broken"
    shutil.copytree(nut, broken)
    for weights in broken.rglob("model.safetensors"):  # meta.json still there
        weights.write_bytes(b"not safetensors")
    return {"fabric": fabric, "nut": nut, "fabric2": copy, "broken": str(broken)}


@pytest.fixture(scope="module")
def images(category_bundles) -> dict[str, bytes]:
    """A defective test image of each category, as PNG bytes."""
    out = {}
    for name, (_, cat) in category_bundles.items():
        test = Path(cat) / "test"
        out[name] = sorted(p for p in test.glob("*/*.png") if p.parent.name != "good")[0]
    return {k: p.read_bytes() for k, p in out.items()}


@pytest.fixture(scope="module")
def client(ray_local, named):
    """serve_config.yaml with user_config.models = ``named`` and an LRU of two models."""
    import yaml
    from ray import serve

    port = free_port()
    raw = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    app = raw["applications"][0]
    app["args"].update(replicas=1, max_num_models_per_replica=LRU)
    del app["args"]["max_replicas"]
    user = app["deployments"][0]["user_config"]
    del user["bundle_uri"]
    user["models"] = named
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy_apps(raw)
    c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    c.serve_config = raw  # type: ignore[attr-defined]  # what the batching test changes
    deadline = time.time() + 60
    while c.get("/healthz").status_code != 200:
        assert time.time() < deadline, "endpoint did not become healthy"
        time.sleep(0.5)
    yield c
    c.close()
    serve.delete(APP)
    serve.shutdown()


def _predict(c: httpx.Client, data: bytes, model: str | None = None, header: str | None = None):
    headers = {"content-type": "image/png"}
    if header:
        headers["serve_multiplexed_model_id"] = header
    params = {"model": model} if model else None
    return c.post("/v1/predict", content=data, headers=headers, params=params)


def _core_score(bundle: str, data: bytes) -> float:
    det = load_bundle(bundle)
    arr = decode_image(data, "test", det.cfg.score.max_image_pixels)
    return float(det.predict(to_tensor(arr, det.cfg.model.image_size)[None]).image_scores[0])


def test_each_name_scores_like_its_own_bundle(client, named, images):
    for name in ("fabric", "nut"):
        expected = _core_score(named[name], images[name])
        for r in (
            _predict(client, images[name], model=name),
            _predict(client, images[name], header=name),
        ):
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == name
            assert body["model_version"] == read_meta(named[name])["version"]
            assert body["image_score"] == pytest.approx(expected, rel=1e-4)
    # the same bytes through the two bundles: different models, different scores
    a = _predict(client, images["nut"], model="fabric").json()["image_score"]
    b = _predict(client, images["nut"], model="nut").json()["image_score"]
    assert a != pytest.approx(b, rel=1e-3)


def test_models_lists_names_versions_and_what_is_loaded(client, named, images):
    assert _predict(client, images["nut"], model="nut").status_code == 200
    listed = client.get("/v1/models").json()
    by_name = {m["name"]: m for m in listed["models"]}
    assert sorted(by_name) == sorted(named)
    for name in ("fabric", "nut", "fabric2"):
        assert by_name[name]["uri"] == named[name]
        assert by_name[name]["version"] == read_meta(named[name])["version"]
    assert by_name["nut"]["loaded"] and by_name["nut"]["loaded_version"] is not None
    assert by_name["broken"]["loaded"] is False
    assert listed["max_num_models_per_replica"] == LRU
    assert sum(m["loaded"] for m in listed["models"]) <= LRU


def test_unknown_or_unnamed_model_is_a_client_error(client, named, images):
    r = _predict(client, images["nut"], model="bolt")
    assert r.status_code == 404
    assert "bolt" in r.json()["error"] and r.json()["models"] == sorted(named)
    r = _predict(client, images["nut"], header="bolt")
    assert r.status_code == 404
    # several models and none named: which one is ambiguous
    r = _predict(client, images["nut"])
    assert r.status_code == 400 and r.json()["models"] == sorted(named)
    r = _predict(client, images["nut"], model="nut", header="fabric")
    assert r.status_code == 400 and "disagree" in r.json()["error"]


def test_broken_bundle_is_503_and_the_others_keep_serving(client, named, images):
    for _ in range(2):  # the second answer comes from the remembered failure
        r = _predict(client, images["nut"], model="broken")
        assert r.status_code == 503
        assert "broken" in r.json()["error"] and "could not be loaded" in r.json()["error"]
        ok = _predict(client, images["nut"], model="nut")
        assert ok.status_code == 200, ok.text
        assert ok.json()["image_score"] == pytest.approx(
            _core_score(named["nut"], images["nut"]), rel=1e-4
        )


def test_more_models_than_the_lru_rotate_without_errors(client, named, images):
    names = ["fabric", "nut", "fabric2"] * 3  # 3 models through an LRU of 2, round robin
    expected = {n: _core_score(named[n], images["nut"]) for n in set(names)}
    for name in names:
        r = _predict(client, images["nut"], model=name)
        assert r.status_code == 200, r.text
        assert r.json()["image_score"] == pytest.approx(expected[name], rel=1e-4)
        loaded = client.get("/v1/stats").json()["loaded_models"]
        assert name in loaded and len(loaded) <= LRU


def _set_batch_wait(c: httpx.Client, seconds: float) -> None:
    """Redeploy with another batch_wait_timeout_s (user_config: in place) and wait for it."""
    import copy

    raw = copy.deepcopy(c.serve_config)  # type: ignore[attr-defined]
    raw["applications"][0]["deployments"][0]["user_config"]["batch_wait_timeout_s"] = seconds
    deploy_apps(raw)
    deadline = time.time() + 60
    while c.get("/v1/model", params={"model": "nut"}).json()["serving"][
        "batch_wait_timeout_s"
    ] != pytest.approx(seconds):
        assert time.time() < deadline, "batch_wait_timeout_s was never applied"
        time.sleep(0.2)


def test_concurrent_requests_batch_per_model(client, named, images):
    """16 clients on two models at once: every answer has its own model's score (a batch
    never mixes models), and requests of one model shared forward passes. All name their
    model with ``?model=``: Serve's batcher only splits batches by the header, so here the
    app's own grouping is what keeps the models apart. Batches wait up to 2 s to fill, so
    the requests need not arrive within the shipped 20 ms to share one."""
    expected = {n: _core_score(named[n], images[n]) for n in ("fabric", "nut")}
    for name in expected:  # both loaded first: no load inside the measured batches
        assert _predict(client, images[name], model=name).status_code == 200
    _set_batch_wait(client, 2.0)
    try:
        with ThreadPoolExecutor(16) as pool:
            out = list(
                pool.map(
                    lambda name: (name, _predict(client, images[name], model=name)),
                    ["fabric", "nut"] * 16,
                )
            )
    finally:
        _set_batch_wait(client, 0.02)
    for name, r in out:
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name
        assert r.json()["image_score"] == pytest.approx(expected[name], rel=1e-4)
    for name in expected:  # each model shared a forward pass
        assert max(r.json()["batch_size"] for n, r in out if n == name) > 1


def test_live_metrics_reach_rays_prometheus_endpoint(client, prometheus, named, images):
    text = prometheus.text()
    n_nut = prometheus.value("mspray_serve_images_total", text, model="nut")
    n_ok = prometheus.value("mspray_serve_request_latency_s_count", text, model="nut", outcome="ok")
    n_404 = prometheus.value(
        "mspray_serve_request_latency_s_count", text, model="unknown", outcome="unknown_model"
    )
    for _ in range(3):
        assert _predict(client, images["nut"], model="nut").status_code == 200
    assert _predict(client, images["nut"], model="bolt").status_code == 404
    version = read_meta(named["nut"])["version"]

    def moved(t: str) -> bool:
        v = prometheus.value
        return (
            v("mspray_serve_images_total", t, model="nut") >= n_nut + 3
            and v("mspray_serve_request_latency_s_count", t, model="nut", outcome="ok") >= n_ok + 3
            and v(
                "mspray_serve_request_latency_s_count", t, model="unknown", outcome="unknown_model"
            )
            >= n_404 + 1
            and v("mspray_serve_batch_size_count", t, model="nut") >= 1
            and v("mspray_serve_model_info", t, model="nut", version=version) == 1
        )

    prometheus.wait_until(moved, "the serve metrics")
