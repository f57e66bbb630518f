"""Device failures that a restart would not mend end as error rows, not endless restarts:
a deterministic CUDA error ("no kernel image is available", a device-side assert) gives the
unit's images error rows at once, in the same process; a hardware fault that keeps hitting
one unit restarts the actor only ``HARDWARE_RETRIES`` times, and never again on that node in
the run. Either way the run ends with its summary. Faults are injected on a simulated "GPU"
node by ``gpu_fault/sitecustomize.py``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mspray import storage
from mspray.artifacts.output import read_results
from mspray.config import PoolConfig
from mspray.config.runs import ScoreRun
from mspray.ray.data.scoring import score_prefix
from mspray.ray.runtime import ACTOR_RESTARTS, HARDWARE_RETRIES

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

HOOKS = str(Path(__file__).parent / "gpu_fault")


def _pids(state: Path) -> list[str]:
    return [line.split()[0] for line in (state / "calls.log").read_text().splitlines()]


def test_device_errors_become_error_rows_after_bounded_restarts(sim_connect, tiny_bundle, tmp_path):
    bundle, spec = tiny_bundle
    src = storage.list_files(os.path.join(spec.split(":", 1)[1], "synthetic", "test"))
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(6):
        shutil.copy(src[i % len(src)], inp / f"{i:03d}.png")
    state = tmp_path / "fault"
    state.mkdir()
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in (HOOKS, os.environ.get("PYTHONPATH")) if p),
        "MSPRAY_TEST_GPU_FAULT": str(state),
    }
    run = {"pool": PoolConfig(workers=1), "overrides": {"score.device": "cuda"}}
    with sim_connect(env):
        # a kernel built for another GPU: every call fails the same way, in any process
        (state / "every").write_text("CUDA error: no kernel image is available for execution")
        out = str(tmp_path / "deterministic")
        s = score_prefix(ScoreRun(bundle=bundle, input=str(inp), output=out, part_size=3), **run)
        assert (s.scored, s.errors, s.failed_units, s.missing) == (6, 6, 0, 0)
        errors = read_results(out, ["error"]).column("error").to_pylist()
        assert all("no kernel image" in e and "not retried" in e for e in errors), errors
        assert len(set(_pids(state))) == 1  # never restarted

        # a GPU with a hardware fault on every try: the first unit is retried in fresh
        # processes, then given up; the node's later units are not restarted for again
        (state / "every").write_text("CUDA error: an illegal memory access was encountered")
        (state / "calls.log").unlink()
        out = str(tmp_path / "hardware")
        s = score_prefix(ScoreRun(bundle=bundle, input=str(inp), output=out, part_size=3), **run)
        assert (s.scored, s.errors, s.failed_units, s.missing) == (6, 6, 0, 0)
        errors = sorted(read_results(out, ["error"]).column("error").to_pylist())
        assert all("illegal memory access" in e for e in errors), errors
        assert sum(f"given up after {HARDWARE_RETRIES} retries" in e for e in errors) == 3
        assert sum("on a GPU that failed before" in e for e in errors) == 3
        # a fresh process per try, and never more than the bounded restarts (a process can
        # also die between two units: the restarts, not the processes, are what is bounded)
        assert HARDWARE_RETRIES + 1 <= len(set(_pids(state))) <= ACTOR_RESTARTS + 1
