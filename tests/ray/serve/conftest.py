"""Fixtures of the Serve tests (helpers they share: ``serve_util.py`` here).

- ``bundles`` (session): "a" the session's trained bundle (``tiny_bundle``), "b" another
  seed's untrained encoders (epochs=0 builds banks right away: another version, which is
  all the serving layer needs), "bad" a copy of "b" with truncated weights (a half-copied
  upload); bundle name -> local path.
"""

from __future__ import annotations

import shutil

import pytest

from mspray.data.datasets import train_paths
from mspray.pipeline.steps import fit_detector


@pytest.fixture(scope="session")
def bundles(tiny_bundle, synthetic_root, tmp_path_factory, tiny_cfg) -> dict[str, str]:
    """Bundles "a", "b" and "bad" (see the module doc)."""
    uris = train_paths(f"mvtec:{synthetic_root}", "synthetic")
    root = tmp_path_factory.mktemp("serve_bundles")
    b = str(root / "b")
    fit_detector(tiny_cfg.replace(**{"train.seed": 1, "train.epochs": 0}), uris, out=b)
    bad = root / "bad"
    shutil.copytree(b, bad)
    for weights in bad.rglob("model.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    return {"a": tiny_bundle[0], "b": b, "bad": str(bad)}
