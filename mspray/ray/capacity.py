"""What the connected Ray cluster has and what it can have.

An autoscaling cluster (``cluster.yaml``: a CPU head, GPU workers from zero) is a head alone
when a nightly job arrives. Deciding ``device=auto``, actor resources and the pool's size
from the nodes alive at that moment would score on the CPU and never ask for a GPU node. So
the cluster is described by its **node kinds**: every alive node, plus every worker node type
of its autoscaler, with how many of them it may launch. The node types come from:

1. the cluster config the GCS holds (reported by managed autoscalers; Ray Data reads the
   same record), else
2. the autoscaling config the cluster's autoscaler monitor runs with (``ray up`` starts it
   on the head with ``--autoscaling-config=~/ray_bootstrap_config.yaml``; ``ray job submit``
   runs the driver on that head), found through the monitor's command line.

A cluster whose autoscaler keeps its config elsewhere (KubeRay's autoscaler sidecar) shows
only its alive nodes: set ``score.device=cuda`` there to wait for GPU nodes.
:func:`requested_nodes` asks the autoscaler for GPU nodes before a pool starts, so they boot
while the driver plans, and withdraws the request afterwards (it would keep them up).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeKind:
    """One kind of node of the cluster: its logical resources and how many of it there are
    or may be (``count``; ``-1``: no bound). ``name`` is the autoscaler's node type, ``""``
    for an alive node."""

    resources: dict[str, float] = field(default_factory=dict)
    count: int = 1
    name: str = ""

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0))


def alive_node_records() -> list[dict]:
    """``ray.nodes()`` records of the alive nodes of the connected cluster (none without Ray)."""
    import ray

    if not ray.is_initialized():
        return []
    return [n for n in ray.nodes() if n.get("Alive")]


def autoscaler_node_types() -> list[NodeKind]:
    """The worker node types the connected cluster's autoscaler may launch (``count`` > 0 or
    unbounded), from the GCS cluster config, else the monitor's config file; empty for a
    cluster without an autoscaler (or one whose config cannot be found from here)."""
    import ray

    if not ray.is_initialized():
        return []
    kinds = _types_from_gcs()
    if kinds is None:
        kinds = _types_from_monitor(ray.get_runtime_context().gcs_address)
    return [k for k in kinds or [] if k.count != 0]


def node_kinds() -> list[NodeKind]:
    """Every alive node (one each) and every worker node type of the autoscaler."""
    alive = [NodeKind(dict(n["Resources"])) for n in alive_node_records()]
    return alive + autoscaler_node_types()


def possible_gpus(kinds: list[NodeKind]) -> float:
    """GPUs the cluster holds at its largest: the alive ones, or what the node types add up
    to when that is more (``inf`` for an unbounded GPU node type)."""
    alive = sum(k.gpus for k in kinds if not k.name)
    typed = 0.0
    for k in kinds:
        if k.name and k.gpus > 0:
            typed += math.inf if k.count < 0 else k.count * k.gpus
    return max(alive, typed)


def can_grow() -> bool:
    """Whether the connected cluster's autoscaler has worker node types (nodes may appear
    that do not exist now)."""
    return bool(autoscaler_node_types())


@contextmanager
def requested_nodes(bundle: dict[str, float], count: int) -> Iterator[None]:
    """Ask the autoscaler for room for ``count`` × ``bundle`` (e.g. GPU actors) now, before a
    pool's actors exist to ask for it, and withdraw the request on exit: a standing request
    would keep the nodes from ever scaling down. Nothing is asked of a cluster without
    worker node types."""
    if count < 1 or not can_grow():
        yield
        return
    from ray.autoscaler.sdk import request_resources

    log.info("asking the autoscaler for %d nodes' room of %s", count, bundle)
    request_resources(bundles=[dict(bundle)] * count)
    try:
        yield
    finally:
        request_resources(bundles=[])


#: Where the GCS keeps the cluster config a managed autoscaler reports (the record that
#: ``ray._private.state.state.get_cluster_config()`` reads; read here through the public
#: key-value client, as mspray imports no private Ray module).
CLUSTER_CONFIG_KV = ("__autoscaler", "__autoscaler_cluster_config")


def _types_from_gcs() -> list[NodeKind] | None:
    """Node types of the cluster config in the GCS, None when there is none."""
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    namespace, key = CLUSTER_CONFIG_KV
    try:
        raw = internal_kv._internal_kv_get(key, namespace=namespace)
        config = autoscaler_pb2.ClusterConfig.FromString(raw) if raw else None
    except Exception:  # an older GCS without the record, or one we cannot parse
        log.debug("no cluster config in the GCS", exc_info=True)
        return None
    if config is None or not config.node_group_configs:
        return None
    return [
        NodeKind(
            {k: float(v) for k, v in g.resources.items()},
            -1 if g.max_count < 0 else int(g.max_count),
            g.name or "node-group",
        )
        for g in config.node_group_configs
    ]


def _types_from_monitor(gcs_address: str) -> list[NodeKind] | None:
    """Worker node types of the autoscaling config that this cluster's autoscaler monitor
    (a process on this machine, the head) was started with; None when there is none."""
    path = _monitor_config_path(gcs_address)
    if path is None:
        return None
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f)  # YAML or JSON
    except OSError as e:
        log.warning("cannot read the autoscaler config %s: %s", path, e)
        return None
    head = config.get("head_node_type")
    cap = int(config.get("max_workers", -1))
    kinds = []
    for name, t in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        n = int(t.get("max_workers", cap))
        kinds.append(NodeKind(dict(t.get("resources") or {}), min(n, cap) if cap >= 0 else n, name))
    return kinds


def _monitor_config_path(gcs_address: str) -> str | None:
    """``--autoscaling-config`` of the autoscaler monitor serving ``gcs_address``."""
    import psutil

    port = gcs_address.rsplit(":", 1)[-1]
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not any(a.endswith("monitor.py") for a in cmd):
            continue
        gcs = [a.split("=", 1)[1] for a in cmd if a.startswith("--gcs-address=")]
        if not gcs or gcs[0].rsplit(":", 1)[-1] != port:
            continue
        for a in cmd:
            if a.startswith("--autoscaling-config="):
                return os.path.expanduser(a.split("=", 1)[1])
    return None
