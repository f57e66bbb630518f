"""A nightly job on a cluster that starts cold (``cluster.yaml``: a CPU head, GPU workers
from zero): ``device=auto`` and the actors' resources come from the node types the
autoscaler can launch, not from the head alone, and local paths are refused there.

The fast tests give the node kinds by hand; the slow one runs ``mspray score`` on the
simulated autoscaling cluster (``tests/ray/cluster.py``), which must bring up a "GPU" node
for the model actor, with the node type's CPU share."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
from cluster import GPU_NODE, worker_nodes

from mspray import storage
from mspray.artifacts.output import read_results
from mspray.cli import main
from mspray.config import MSPrayConfig, PoolConfig
from mspray.ray.capacity import CLUSTER_CONFIG_KV, NodeKind, autoscaler_node_types, possible_gpus
from mspray.ray.runtime import (
    UNBOUNDED_GPU_ACTORS,
    ActorResources,
    actor_resources,
    concurrent_actors,
)

HEAD = NodeKind({"CPU": 8.0})  # the CPU head, alone when the job arrives
GPU_TYPE = NodeKind({"CPU": 16.0, "GPU": 1.0}, 3, "gpu_worker")
CPU_TYPE = NodeKind({"CPU": 16.0}, 4, "cpu_worker")


def _cfg(device: str = "auto") -> MSPrayConfig:
    return MSPrayConfig().replace(**{"score.device": device})


def test_auto_on_a_cold_cluster_reserves_gpus_of_its_node_types(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mspray"):
        res = actor_resources(PoolConfig(), _cfg(), [HEAD, CPU_TYPE, GPU_TYPE])
    # a GPU, and half of the GPU node type's 16 CPUs, though no GPU node is up yet
    assert (res.gpus, res.cpus) == (1.0, 8.0)
    assert "no GPU node is up yet" in caplog.text and "gpu_worker" in caplog.text
    # a cluster that can never have a GPU scores on the CPU
    assert actor_resources(PoolConfig(), _cfg(), [HEAD, CPU_TYPE]).gpus == 0


def test_every_model_of_a_fleet_counts() -> None:
    fleet = [_cfg("cpu"), _cfg("auto")]  # the first alone would keep the actors on the CPU
    assert actor_resources(PoolConfig(), fleet, [HEAD, GPU_TYPE]).gpus == 1.0
    assert actor_resources(PoolConfig(), [_cfg("cpu")] * 2, [HEAD, GPU_TYPE]).gpus == 0


def test_the_pool_is_planned_for_the_gpus_the_cluster_can_have() -> None:
    gpu_actor = ActorResources(cpus=8.0, gpus=1.0)
    assert possible_gpus([HEAD, GPU_TYPE]) == 3
    assert concurrent_actors(PoolConfig(), gpu_actor, nodes=[HEAD, GPU_TYPE]) == 3
    assert concurrent_actors(PoolConfig(workers=2), gpu_actor, nodes=[HEAD, GPU_TYPE]) == 2
    unbounded = NodeKind({"CPU": 16.0, "GPU": 1.0}, -1, "gpu_worker")
    assert concurrent_actors(PoolConfig(), gpu_actor, nodes=[HEAD, unbounded]) == (
        UNBOUNDED_GPU_ACTORS
    )


@pytest.mark.ray
def test_node_types_reported_to_the_gcs_are_read(ray_local) -> None:
    """The cluster config a managed autoscaler reports to the GCS (the record Ray Data
    reads too) gives the node types; the session Ray gets its empty record back after."""
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    config = autoscaler_pb2.ClusterConfig()
    gpu = config.node_group_configs.add(name="gpu_worker", min_count=0, max_count=4)
    gpu.resources.update({"CPU": 8, "GPU": 1})
    config.node_group_configs.add(name="cpu_worker", max_count=0).resources.update({"CPU": 4})
    namespace, key = CLUSTER_CONFIG_KV
    internal_kv._internal_kv_put(key, config.SerializeToString(), namespace=namespace)
    try:
        types = autoscaler_node_types()
        assert types == [NodeKind({"CPU": 8.0, "GPU": 1.0}, 4, "gpu_worker")]  # max 0: none
        assert actor_resources(PoolConfig(), _cfg()) == ActorResources(cpus=4.0, gpus=1.0)
    finally:
        internal_kv._internal_kv_del(key, namespace=namespace)
    assert autoscaler_node_types() == []


@pytest.mark.ray
@pytest.mark.slow
def test_score_on_a_cold_cluster_brings_up_a_gpu_node_for_its_model_actor(
    autoscaling_sim_cluster, tiny_bundle, tmp_path, capsys, caplog
):
    bundle, spec = tiny_bundle
    src = storage.list_files(os.path.join(spec.split(":", 1)[1], "synthetic", "test"))
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for i in range(8):
        shutil.copy(src[i % len(src)], inp / f"{i:02d}.png")
    assert worker_nodes() == []  # the 0-CPU head alone when the job arrives
    score = ["score", "--bundle", bundle, "--input", str(inp), "--output", str(out)]

    # a lone head on this machine, but its autoscaler can add nodes: local paths refused
    assert main(["-q", *score]) == 2
    err = capsys.readouterr().err
    assert "autoscaler can add worker nodes (cpu_worker, gpu_worker)" in err, err
    assert worker_nodes() == [] and not out.exists()  # refused before anything started

    # device auto (the default) on the cold cluster: a "GPU" node comes up for the actor
    summary_json = tmp_path / "summary.json"
    run = [*score, "--shared-fs", "--workers", "1", "--summary-json", str(summary_json)]
    with caplog.at_level(logging.INFO, logger="mspray"):
        assert main(["-q", *run]) == 0
    s = json.loads(summary_json.read_text())
    nodes = {n["NodeID"]: n["Resources"] for n in worker_nodes()}
    assert s["actor_nodes"] and all(nodes[n].get("GPU", 0) == 1 for n in s["actor_nodes"])
    assert (s["scored"], s["errors"], s["missing"]) == (8, 0, 0)
    assert len(read_results(str(out), ["path"])) == 8
    # the actor reserved the GPU node type's CPU share (half of its CPUs per GPU)
    share = ActorResources(cpus=GPU_NODE["CPU"] / 2, gpus=1.0)
    assert f"({share})" in caplog.text, caplog.text
    assert "no GPU node is up yet" in caplog.text
    assert "asking the autoscaler" in caplog.text
