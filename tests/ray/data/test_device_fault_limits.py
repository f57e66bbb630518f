"""Device failures that a restart would not mend end as error rows, not endless restarts:
a deterministic CUDA error ("no kernel image is available", a device-side assert) gives the
unit's images error rows at once, in the same process; a hardware fault that keeps hitting
one unit restarts the actor only ``HARDWARE_RETRIES`` times, and never again on that node in
the run. Either way the run ends with its summary. Faults are injected on a simulated "GPU"
node by ``gpu_fault/sitecustomize.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from mspray.artifacts.output import read_results
from mspray.config import PoolConfig
from mspray.config.runs import ScoreRun
from mspray.ray.data.scoring import score_prefix
from mspray.ray.runtime import ACTOR_RESTARTS, HARDWARE_RETRIES

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


def _pids(state: Path) -> list[str]:
    return [line.split()[0] for line in (state / "calls.log").read_text().splitlines()]


def test_device_errors_become_error_rows_after_bounded_restarts(
    sim_connect, tiny_bundle, gpu_fault, tmp_path
):
    bundle = tiny_bundle[0]
    inp, state, env = gpu_fault(6)
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
