"""Batch scoring on a simulated multi-node cluster (``tests/ray/cluster.py``): the actor pool
grows with an autoscaling cluster that starts with no worker nodes, decoding runs on CPU
tasks apart from the model actors, and "GPU" nodes without CUDA fall back to the CPU."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
from cluster import worker_nodes

from mspray import storage
from mspray.artifacts.output import read_results
from mspray.config import PoolConfig
from mspray.config.runs import ScoreRun
from mspray.ray.data.scoring import score_prefix

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CUDA_FALLBACK = "requested but CUDA is not available here: using the CPU"


def _archive(spec: str, dst: Path, n: int) -> list[str]:
    """``n`` images copied from the synthetic test set under ``dst``; their sorted paths."""
    src = storage.list_files(os.path.join(spec.split(":", 1)[1], "synthetic", "test"))
    for i in range(n):
        out = dst / f"cam{i % 3}" / f"{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(Path(src[i % len(src)]).read_bytes())
    return sorted(storage.list_files(str(dst)))


def _fallback_lines(session_dir: str) -> list[str]:
    lines = []
    for f in glob.glob(os.path.join(session_dir, "logs", "worker-*")):
        with open(f, errors="replace") as fh:
            lines += [line for line in fh if CUDA_FALLBACK in line]
    return lines


def test_pool_grows_from_zero_worker_nodes_to_several_gpu_nodes(
    autoscaling_sim_cluster, tiny_bundle, tmp_path, monkeypatch
):
    from ray.data import DataContext

    bundle, spec = tiny_bundle
    expected = _archive(spec, tmp_path / "in", 160)
    assert worker_nodes() == []  # nothing but the 0-CPU head when the job is submitted
    out = tmp_path / "out"
    # Ray Data starts the pool's min_size actors asynchronously; wait for them, so which
    # actors get units does not depend on the load of this shared machine
    monkeypatch.setattr(DataContext.get_current(), "wait_for_min_actors_s", 600)
    # one GPU per model actor, at least 2 actors, no upper bound: the pool is not sized
    # from the (empty) cluster at submit time; the autoscaler adds "GPU" nodes for it
    s = score_prefix(
        ScoreRun(bundle=bundle, input=str(tmp_path / "in"), output=str(out), part_size=8),
        pool=PoolConfig(min_workers=2, gpus_per_worker=1),
    )
    nodes = {n["NodeID"]: n["Resources"] for n in worker_nodes()}
    print(f"autoscaling: {s.actors} model actors on {len(s.actor_nodes)} nodes; "
          f"{len(nodes)} worker nodes")  # fmt: skip
    # the autoscaler launched a "GPU" node for each of the pool's (at least 2) actors; how
    # many of them got units is timing: when decoding is the bottleneck one actor keeps up
    assert sum(r.get("GPU", 0) == 1 for r in nodes.values()) >= 2, nodes
    assert s.actors >= 1 and all(nodes[n].get("GPU", 0) == 1 for n in s.actor_nodes)
    paths = read_results(str(out), ["path"]).column("path").to_pylist()
    assert sorted(paths) == expected  # every image scored exactly once
    assert (s.scored, s.errors, s.failed_units, s.missing, s.duplicates) == (160, 0, 0, 0, 0)
    # no CUDA here: each model actor on a "GPU" node said so once and ran on the CPU
    lines = _fallback_lines(autoscaling_sim_cluster.head_node.get_session_dir_path())
    assert len(lines) >= s.actors and len(lines) <= len(nodes), lines


def test_decoding_runs_on_cpu_nodes_and_the_model_on_the_gpu_node(
    sim_cluster, tiny_bundle, tmp_path, bad_inputs
):
    """The "GPU" node has one CPU, which its model actor holds: every unit is decoded on
    the CPU node by a task, scored on the "GPU" node, and bad files still get error rows."""
    bundle, spec = tiny_bundle
    expected = _archive(spec, tmp_path / "in", 24)
    for name, data in bad_inputs.items():
        (tmp_path / "in" / name).write_bytes(data)
        expected.append(str(tmp_path / "in" / name))
    s = score_prefix(
        ScoreRun(
            bundle=bundle, input=str(tmp_path / "in"), output=str(tmp_path / "out"), part_size=5
        ),
        pool=PoolConfig(gpus_per_worker=1),
        overrides={"score.max_image_bytes": 100_000},
    )
    nodes = {n["NodeID"]: n["Resources"] for n in worker_nodes()}
    gpu = [n for n, r in nodes.items() if r.get("GPU", 0) > 0]
    cpu = [n for n, r in nodes.items() if r.get("GPU", 0) == 0]
    assert (s.actors, s.actor_nodes, s.decode_nodes) == (1, gpu, cpu)
    df = read_results(str(tmp_path / "out")).to_pandas().set_index("path")
    assert sorted(df.index) == sorted(expected)
    assert df["error"].notna().sum() == len(bad_inputs) == s.errors
    assert df.loc[df["error"].isna(), "image_score"].notna().all()
