"""Fixtures of the Ray-layer tests: one tiny trained bundle for the whole session.

- ``tiny_bundle`` (session): a detector trained for one epoch (64 px images, scales 32 and
  16, random init) on the session's synthetic dataset, saved as a local bundle; yields
  ``(bundle_path, dataset_spec)``.
- ``png_bytes`` (function): ``png_bytes((w, h), mode="RGB", seed=0)`` -> PNG file bytes
  (random RGB noise, or a blank 1-bit image).
- ``bad_inputs`` (session): name -> bytes of one of each kind of bad file a nightly archive
  can hold (zero-byte, truncated, not an image, decompression bomb, over 100 kB).
- ``sim_cluster`` (function): a simulated multi-node Ray (0-CPU head, one CPU node, one
  "GPU" node), connected; yields the ``ray.cluster_utils.Cluster``.
- ``autoscaling_sim_cluster`` (function): the 0-CPU head with Ray's autoscaler over its fake
  multi-node provider and zero worker nodes (up to 1 CPU and 2 "GPU" nodes), connected.

The two cluster fixtures live in ``tests/ray/cluster.py`` (see there for their node types);
they use ``ray_exclusive``, so the session's local Ray is stopped while they run.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from cluster import autoscaling_cluster, multi_node_cluster  # tests/ray/cluster.py
from PIL import Image


@pytest.fixture(scope="session")
def tiny_bundle(synthetic_root, tmp_path_factory, tiny_cfg) -> tuple[str, str]:
    """A tiny trained bundle (local path) and the ``mvtec:`` spec of its dataset."""
    from mspray.data.datasets import train_paths
    from mspray.fit import fit_detector

    spec = f"mvtec:{synthetic_root}"
    out = str(tmp_path_factory.mktemp("scoring_bundle") / "bundle")
    cfg = tiny_cfg
    fit_detector(cfg, train_paths(spec, "synthetic"), out=out, progress=False)
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


@pytest.fixture
def sim_cluster(ray_exclusive):
    """A 0-CPU head, one CPU node and one "GPU" node, the driver connected."""
    with multi_node_cluster(cpu_nodes=1, gpu_nodes=1) as cluster:
        yield cluster


@pytest.fixture
def autoscaling_sim_cluster(ray_exclusive, tmp_path):
    """A 0-CPU head with the autoscaler and no worker nodes yet, the driver connected."""
    with autoscaling_cluster(tmp_path, max_cpu_workers=1, max_gpu_workers=2) as cluster:
        yield cluster
