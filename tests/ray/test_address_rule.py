"""The address rule: without ``--address`` (or ``$RAY_ADDRESS``) every command runs on a
private local Ray, also when ``ray start --head`` runs on the machine or a dead head left its
address file; ``--address auto`` joins the machine's cluster.

Each check runs :func:`mspray.ray.runtime.init_ray` (the one start-up every command goes
through) in a fresh process whose ``RAY_TMPDIR`` holds the head's address file, so nothing
here touches the machine's own ``/tmp/ray``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cluster import free_port, private_ray_env, ray_start_head  # tests/ray/cluster.py

PROBE = """
import json, sys, ray
from mspray.config.run import use_run
from mspray.ray.runtime import LOCAL_MIN_CPUS, init_ray
out = {"min_cpus": LOCAL_MIN_CPUS}
for name, address in [("default", None), *([("auto", "auto")] if "auto" in sys.argv else [])]:
    with use_run(progress=False, address=address):
        started = init_ray()
    out[name] = {"started": started, "cpus": ray.cluster_resources().get("CPU"),
                 "gcs": ray.get_runtime_context().gcs_address}
    ray.shutdown()
print("PROBE " + json.dumps(out), flush=True)
"""


def _probe(tmp_root: Path, *args: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *args], env=private_ray_env(tmp_root),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    lines = [x for x in r.stdout.splitlines() if x.startswith("PROBE ")]
    assert r.returncode == 0 and lines, f"exit {r.returncode}:\n{r.stdout}\n{r.stderr[-3000:]}"
    return json.loads(lines[-1][len("PROBE ") :])


@pytest.fixture
def short_tmp():
    """A short temp root (Ray's unix sockets live under it: 108-byte limit)."""
    with tempfile.TemporaryDirectory(prefix="msp-ar-", dir="/tmp") as d:
        yield Path(d)


@pytest.mark.ray
def test_no_address_is_private_next_to_a_ray_start_head_and_auto_joins_it(short_tmp):
    with ray_start_head(short_tmp, num_cpus=2) as head:
        got = _probe(short_tmp, "auto")
    private, joined = got["default"], got["auto"]
    assert private["started"] and private["gcs"] != head
    assert private["cpus"] >= got["min_cpus"]  # our own logical CPUs, not the head's 2
    assert not joined["started"] and joined["gcs"] == head and joined["cpus"] == 2


@pytest.mark.ray
def test_a_stale_address_file_does_not_stop_a_local_command(short_tmp):
    address_file = short_tmp / "ray" / "ray_current_cluster"
    address_file.parent.mkdir()
    address_file.write_text(f"127.0.0.1:{free_port()}")  # a head that died
    got = _probe(short_tmp)
    assert got["default"]["started"] and got["default"]["cpus"] >= got["min_cpus"]
