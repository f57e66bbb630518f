"""Bank building and calibration take their images from decode tasks, as scoring does: their
model actors run the model on decoded units and read no file themselves."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import ray

from mspray.artifacts.bundle import load_bundle, load_config
from mspray.data.datasets import train_paths
from mspray.data.images import load_images
from mspray.decisions.summaries import summarize_maps
from mspray.ray.data.banks import Embedder
from mspray.ray.data.calibration import FoldScorer
from mspray.ray.data.decoded import common_root
from mspray.ray.data.reading import decode_units

pytestmark = pytest.mark.ray


def _unit(uris: list[str], cfg) -> pa.Table:
    """``uris`` as one unit, read and decoded the way the decode tasks do it."""
    root = common_root(uris).rstrip("/")
    units = pa.table({"paths": [uris]})
    return decode_units(units, cfg.model.image_size, cfg.score.model_dump_json(), 2, root)


def test_the_actors_score_decoded_units(ray_local, tiny_bundle, tmp_path, png_bytes):
    bundle, spec = tiny_bundle
    cfg = load_config(bundle)
    good = sorted(train_paths(spec, "synthetic"))[:3]
    bad = tmp_path / "bad.png"
    bad.write_bytes(png_bytes((40, 40))[:100])  # truncated: an error row, not a failure
    uris = [good[0], str(bad), *good[1:]]
    unit = _unit(uris, cfg)
    actor = {"bundle": bundle, "config_json": cfg.to_json(), "cpus": 1, "gpus": 0}
    det = load_bundle(bundle)
    images = load_images(good, cfg.model.image_size)

    scale = max(det.scales)
    positions = {u: 10 + i for i, u in enumerate(uris)}
    out = Embedder(keep={}, scales=[scale], positions=positions, **actor)(unit)
    ok = out["scale"] == scale
    np.testing.assert_allclose(out["emb"][ok], det.bank_embeddings(images, scale), atol=1e-5)
    per_image = int(ok.sum()) // len(good)
    assert out["idx"][ok].tolist() == np.repeat([10, 12, 13], per_image).tolist()
    assert out["idx"][~ok].tolist() == [11] and "bad.png" in out["error"][~ok][0]

    folds = {u: i % 2 for i, u in enumerate(uris)}  # two folds, both with the full banks
    refs = [{str(s): ray.put(b.to_bytes()) for s, b in det.banks.items()} for _ in range(2)]
    got = FoldScorer(fold_banks=refs, folds=folds, **actor)(unit)
    assert [bool(e) for e in got["error"]] == [False, True, False, False]
    summary = summarize_maps(det, det.raw_scale_maps(images))
    for s in det.scales:
        np.testing.assert_allclose(got[f"moments_{s}"][[0, 2, 3]], summary.moments[s], rtol=1e-5)
