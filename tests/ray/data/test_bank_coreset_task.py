"""The global coreset of a bank build (and of an append) runs as a Ray task on a worker: the
driver, often a head node with no CPU to spare, only ships rows and loads finished banks."""

from __future__ import annotations

import numpy as np
import pytest

import mspray.bank
import mspray.bank.coreset
from mspray.artifacts.bundle import load_bundle
from mspray.config import PoolConfig
from mspray.data.datasets import train_paths
from mspray.data.images import load_images
from mspray.pipeline.steps import build_banks, split_holdout
from mspray.ray.executor import RayExecutor


def _driver_must_not_run(*args, **kwargs):
    raise AssertionError("the driver ran the greedy coreset: it must run in a Ray task")


@pytest.mark.ray
def test_global_coreset_runs_on_a_worker_and_equals_the_core(
    ray_local, tiny_bundle, tmp_path, monkeypatch
):
    bundle, spec = tiny_bundle
    uris = train_paths(spec, "synthetic")
    out = str(tmp_path / "b")
    with monkeypatch.context() as m:  # this (driver) process only; Ray workers are others
        m.setattr(mspray.bank, "greedy_coreset", _driver_must_not_run)
        m.setattr(mspray.bank.coreset, "greedy_coreset", _driver_must_not_run)
        build_banks(
            bundle,
            uris,
            RayExecutor(pool=PoolConfig(workers=1)),
            out=out,
            calibrate=False,
        )
        built = load_bundle(out)
        # append: the picks start from the existing bank, also on the worker
        build_banks(out, uris[:3], RayExecutor(pool=PoolConfig(workers=1)), append=True)
    appended = load_bundle(out)
    assert built.cfg.bank.coreset_ratio == 0.5  # so there was a coreset to run
    # the core on the same images (here, in the driver): the same banks
    bank_uris, _ = split_holdout(uris, built.cfg.train.val_fraction, built.cfg.train.seed)
    ref = load_bundle(out, with_banks=False)
    ref.build_banks(load_images(bank_uris, 64))
    for s in built.scales:
        np.testing.assert_allclose(built.banks[s].vectors(), ref.banks[s].vectors(), atol=1e-5)
        before = ref.banks[s].ntotal
        emb = ref.bank_embeddings(load_images(uris[:3], 64), s)
        assert ref.banks[s].add(emb, ref.cfg.bank) == appended.banks[s].ntotal - before > 0
        np.testing.assert_allclose(appended.banks[s].vectors(), ref.banks[s].vectors(), atol=1e-5)
