"""Fixtures of the Ray-layer tests: one tiny trained bundle for the whole session.

- ``tiny_bundle`` (session): a detector trained for one epoch (64 px images, scales 32 and
  16, random init) on the session's synthetic dataset, saved as a local bundle; yields
  ``(bundle_path, dataset_spec)``.
- ``png_bytes`` (function): ``png_bytes((w, h), mode="RGB", seed=0)`` -> PNG file bytes
  (random RGB noise, or a blank 1-bit image).
- ``bad_inputs`` (session): name -> bytes of one of each kind of bad file a nightly archive
  can hold (zero-byte, truncated, not an image, decompression bomb, over 100 kB).
- ``sim_cluster`` (function): a simulated multi-node Ray (0-CPU head, one CPU node, one
  "GPU" node), connected; yields the ``ray.cluster_utils.Cluster``. Its nodes are started
  once per session (starting and stopping three raylets costs tens of seconds on two
  cores); each test is a job of its own on them.
- ``sim_connect`` (function): ``with sim_connect(env): ...`` connects to the same nodes as
  a job whose workers get the extra environment ``env``.
- ``autoscaling_sim_cluster`` (function): the 0-CPU head with Ray's autoscaler over its fake
  multi-node provider and zero worker nodes (up to 1 CPU and 2 "GPU" nodes), connected.

The cluster fixtures use ``tests/ray/cluster.py`` (see there for their node types); they use
``ray_exclusive``, so the session's local Ray is stopped while they run.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from cluster import (  # tests/ray/cluster.py
    autoscaling_cluster,
    connected,
    start_multi_node,
    stop_cluster,
)
from PIL import Image


@pytest.fixture(scope="session")
def tiny_bundle(synthetic_root, tmp_path_factory, tiny_cfg) -> tuple[str, str]:
    """A tiny trained bundle (local path) and the ``mvtec:`` spec of its dataset."""
    from mspray.data.datasets import train_paths
    from mspray.pipeline.steps import fit_detector

    spec = f"mvtec:{synthetic_root}"
    out = str(tmp_path_factory.mktemp("scoring_bundle") / "bundle")
    cfg = tiny_cfg
    fit_detector(cfg, train_paths(spec, "synthetic"), out=out)
    return out, spec


def _png(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> bytes:
    if mode == "1":
        img = Image.new("1", size)
    else:
        rng = np.random.default_rng(seed)
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def png_bytes():
    """PNG bytes of a random RGB (or blank 1-bit) image of a given size."""
    return _png


@pytest.fixture(scope="session")
def bad_inputs() -> dict[str, bytes]:
    """One of each kind of bad input: name -> file bytes (huge.png is > 100 kB)."""
    good = _png((48, 40), seed=1)
    return {
        "zero.png": b"",
        "truncated.png": good[: len(good) // 2],
        "not_an_image.jpg": b"this is a log file, not a JPEG\n" * 10,
        # 20000x20000 1-bit image: a few kB of PNG, 400 Mpx once decoded
        "bomb.png": _png((20000, 20000), mode="1"),
        "huge.png": _png((300, 300), seed=2),  # ~270 kB
    }


@pytest.fixture(scope="session")
def category_bundles(tmp_path_factory, tiny_cfg) -> dict[str, tuple[str, str]]:
    """Two tiny bundles trained on two different synthetic categories:
    name -> (bundle path, category folder with train/ and test/). "fabric" is a texture,
    "nut" an object on a dark background, each with its own seed."""
    from mspray.data.datasets import train_paths
    from mspray.data.synthetic import make_synthetic_dataset
    from mspray.pipeline.steps import fit_detector

    root = tmp_path_factory.mktemp("categories")
    out = {}
    for name, kind, seed in (("fabric", "texture", 3), ("nut", "object", 4)):
        cat = make_synthetic_dataset(
            str(root / "data"),
            name,
            n_train=8,
            n_test_good=2,
            n_test_defect=3,
            size=64,
            seed=seed,
            kind=kind,
        )
        bundle = str(root / "bundles" / name)
        cfg = tiny_cfg.replace(**{"train.seed": seed})
        fit_detector(cfg, train_paths(f"mvtec:{root / 'data'}", name), out=bundle)
        out[name] = (bundle, cat)
    return out


class Prometheus:
    """Reads what the session's Ray exports to Prometheus (every node's metrics port)."""

    def __init__(self, ray):
        self.ray = ray

    def text(self) -> str:
        import httpx

        return "\n".join(
            httpx.get(f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics").text
            for n in self.ray.nodes()
            if n.get("Alive") and n.get("MetricsExportPort")
        )

    def value(self, metric: str, text: str | None = None, **tags: str) -> float:
        """Sum of ``ray_<metric>`` samples whose labels include ``tags`` (0 when none)."""
        total = 0.0
        pattern = rf"^ray_{metric}\{{([^}}]*)\}} ([0-9.eE+-]+)$"
        for m in re.finditer(pattern, self.text() if text is None else text, re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if all(labels.get(k) == v for k, v in tags.items()):
                total += float(m.group(2))
        return total

    def wait_until(self, ok, what: str, timeout_s: float = 90) -> None:
        """Poll until ``ok(text)`` holds (Ray flushes metrics every few seconds)."""
        import time

        deadline = time.time() + timeout_s
        while True:
            text = self.text()
            if ok(text):
                return
            if time.time() > deadline:
                lines = [line for line in text.splitlines() if "mspray" in line]
                raise AssertionError(f"{what} did not move:\n" + "\n".join(lines))
            time.sleep(2)


@pytest.fixture(scope="session")
def prometheus(ray_local) -> Prometheus:
    """The Prometheus export of the session's Ray (tests may read ray.nodes() ports)."""
    return Prometheus(ray_local)


@pytest.fixture(scope="session")
def _sim_nodes():
    """The nodes of ``sim_cluster`` (started on first use, stopped at the session's end)."""
    cluster = start_multi_node(cpu_nodes=1, gpu_nodes=1)
    yield cluster
    stop_cluster(cluster)


@pytest.fixture
def sim_connect(ray_exclusive, _sim_nodes):
    """``sim_connect(env=None)``: a context manager connecting the driver to the simulated
    cluster's nodes as a new job (``env``: its workers' extra environment)."""
    return lambda env=None: connected(_sim_nodes, env)


@pytest.fixture
def sim_cluster(sim_connect):
    """A 0-CPU head, one CPU node and one "GPU" node, the driver connected."""
    with sim_connect() as cluster:
        yield cluster


@pytest.fixture
def autoscaling_sim_cluster(ray_exclusive, tmp_path):
    """A 0-CPU head with the autoscaler and no worker nodes yet, the driver connected."""
    with autoscaling_cluster(tmp_path, max_cpu_workers=1, max_gpu_workers=2) as cluster:
        yield cluster
