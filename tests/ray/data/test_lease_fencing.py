"""Fencing: once another run takes the output over, the scoring actors of the old run stop
writing parts at once, before its driver's next lease renewal would have told it."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from mspray import storage
from mspray.artifacts.lease import LeaseLost
from mspray.config import PoolConfig
from mspray.config.runs import ScoreRun
from mspray.ray.data.scoring import score_prefix

pytestmark = pytest.mark.ray


def test_actors_stop_writing_parts_when_the_lease_is_taken_over(ray_local, tiny_bundle, tmp_path):
    bundle, spec = tiny_bundle
    root = spec.split(":", 1)[1]
    images = storage.list_files(os.path.join(root, "synthetic", "test"))
    for i, p in enumerate(images):
        storage.write_bytes(str(tmp_path / "in" / f"{i:03d}.png"), storage.read_bytes(p))
    out = tmp_path / "scores"
    done = threading.Event()

    def take_over_after_the_first_part() -> None:
        # another run presumed this one dead: it creates the next lease generation
        while not done.is_set():
            if list(out.glob("part-*.parquet")):
                gens = sorted((out / "_lease").glob("*.json"))
                nxt = int(gens[-1].stem) + 1
                rec = {"owner": "other-run:1:x", "acquired_at": time.time(),
                       "expires_at": time.time() + 600, "ttl_s": 600.0}  # fmt: skip
                (out / "_lease" / f"{nxt:012d}.json").write_text(json.dumps(rec))
                return
            time.sleep(0.005)

    thief = threading.Thread(target=take_over_after_the_first_part, daemon=True)
    thief.start()
    try:
        # one image per part, one actor: many writes, each after a fence check; the TTL is
        # long, so the driver's own heartbeat would not notice the takeover for 200 s
        with pytest.raises(LeaseLost, match="no longer current"):
            score_prefix(
                ScoreRun(
                    bundle=bundle,
                    input=str(tmp_path / "in"),
                    output=str(out),
                    part_size=1,
                    lease_ttl=600,
                ),
                pool=PoolConfig(workers=1),
            )
    finally:
        done.set()
        thief.join()
    parts = list(out.glob("part-*.parquet"))
    # the first part, and at most the one being written when the takeover landed
    assert 1 <= len(parts) <= 2 < len(images)


def test_no_heatmap_is_written_once_the_lease_is_taken_over(ray_local, tiny_bundle, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    from mspray.artifacts.lease import Lease
    from mspray.ray.data.plan import ScoringPlan
    from mspray.ray.data.reading import UNIT_SCHEMA, decode_unit
    from mspray.ray.data.scorer import UnitScorer

    bundle, spec = tiny_bundle
    root = spec.split(":", 1)[1]
    images = storage.list_files(os.path.join(root, "synthetic", "test"))[:3]
    out = tmp_path / "scores"
    plan = ScoringPlan.build(bundle, os.path.dirname(images[0]), str(out), maps=True)
    cfg = plan.first.cfg
    with Lease(str(out), ttl_s=600) as lease:
        scorer = UnitScorer(plan, fence=lease.fence(), bundle=plan.first.uri,
                            config_json=cfg.to_json(), cpus=1, gpus=0)  # fmt: skip
        with ThreadPoolExecutor(2) as pool:
            row = decode_unit(images, cfg.model.image_size, cfg.score, pool)
        unit = pa.Table.from_pylist(
            [{**row, "decoder": "local", "model": "default"}], schema=UNIT_SCHEMA
        ).to_pylist()[0]
        # another run takes the output over while this unit is on its way to the actor
        rec = {"owner": "other-run:1:x", "acquired_at": time.time(),
               "expires_at": time.time() + 600, "ttl_s": 600.0}  # fmt: skip
        (out / "_lease" / f"{lease.gen + 1:012d}.json").write_text(json.dumps(rec))
        summary = scorer.score_unit(unit)
        assert summary["part"] is None and summary["failure"].startswith("LeaseLost")
        assert not (out / "_maps").exists()  # no panel either, not only no part
        assert not list(out.glob("part-*.parquet"))
        with pytest.raises(LeaseLost):
            lease.assert_held()
