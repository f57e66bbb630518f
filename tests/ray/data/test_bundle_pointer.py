"""Only complete versions are ever behind ``latest``: training on Ray saves an encoders-only
version, and consumers of the root keep the previous complete version while its banks are
built on Ray Data and for good when that build fails."""

from __future__ import annotations

import pytest

from mspray.artifacts.bundle import load_bundle, resolve_bundle, save_bundle, version_uri
from mspray.config import PoolConfig
from mspray.data.datasets import train_paths
from mspray.pipeline.steps import build_banks, fit_detector
from mspray.ray.executor import RayExecutor

pytestmark = pytest.mark.ray


def test_a_failed_bank_build_leaves_the_previous_complete_version_current(
    ray_local, tiny_bundle, tiny_cfg, tmp_path
):
    bundle, spec = tiny_bundle
    uris = train_paths(spec, "synthetic")
    root = str(tmp_path / "root")
    complete = save_bundle(load_bundle(bundle), root)

    cfg = tiny_cfg.replace(**{"train.epochs": 0, "train.seed": 3})
    encoders = fit_detector(cfg, uris, out=root, build_banks=False)
    new = version_uri(root, encoders.version)
    assert resolve_bundle(root) == complete  # while the banks are being built

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="could be read"):
        build_banks(new, [str(bad)], RayExecutor(pool=PoolConfig(workers=1)), out=root)
    assert resolve_bundle(root) == complete  # after the failed build
    assert load_bundle(root).version == load_bundle(complete).version

    result = build_banks(new, uris, RayExecutor(pool=PoolConfig(workers=1)), out=root)
    assert resolve_bundle(root) == result.version_uri != complete
    assert result.source == new and set(load_bundle(root).banks) == set(cfg.model.scales)
