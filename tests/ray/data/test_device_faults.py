"""A GPU actor whose CUDA context breaks (illegal memory access, ECC/Xid) exits, so Ray
replaces it with a fresh process and retries its unit there, instead of the broken actor
failing every unit it pulls. The fault is injected on a simulated "GPU" node by
``tests/ray/data/gpu_fault/sitecustomize.py`` on its workers' ``PYTHONPATH``."""

from __future__ import annotations

from collections import Counter

import pytest

from mspray.artifacts.output import read_results
from mspray.config import PoolConfig
from mspray.config.runs import ScoreRun
from mspray.ray.data.scoring import score_prefix

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_gpu_actor_with_a_broken_cuda_context_is_replaced_and_its_unit_retried(
    sim_connect, tiny_bundle, gpu_fault, tmp_path
):
    bundle = tiny_bundle[0]
    inp, state, env = gpu_fault(12)
    out = str(tmp_path / "out")
    with sim_connect(env):
        s = score_prefix(
            ScoreRun(bundle=bundle, input=str(inp), output=out, part_size=4),
            pool=PoolConfig(workers=1),
            overrides={"score.device": "cuda"},
        )
    calls = [line.split() for line in (state / "calls.log").read_text().splitlines()]
    failed = [pid for pid, outcome in calls if outcome == "fail"]
    # the broken process made one model call and no other (no retries, no further units)
    assert len(failed) == 1, calls
    assert Counter(pid for pid, _ in calls)[failed[0]] == 1, calls
    assert any(pid != failed[0] for pid, outcome in calls if outcome == "ok"), calls
    # its unit was retried by the fresh process: every image scored once, nothing failed
    assert (s.scored, s.errors, s.failed_units, s.missing, s.duplicates) == (12, 0, 0, 0, 0)
    paths = read_results(out, ["path"]).column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in inp.iterdir())
