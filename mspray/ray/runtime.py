"""Where Ray work runs: the one Ray start-up, actor-pool options, and the detector actor.

Every Ray entry point (Train, the Data pipelines, Serve, deploy) starts or joins Ray through
:func:`init_ray`, and every Ray Data stage that needs the model subclasses
:class:`DetectorActor` and is added to a dataset with :func:`map_with_detector`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

from mspray.config import MSPrayConfig, PoolConfig
from mspray.config.run import current_run
from mspray.device import resolve_device, wants_gpu
from mspray.ray.capacity import (
    NodeKind,
    alive_node_records,
    autoscaler_node_types,
    node_kinds,
    possible_gpus,
    requested_nodes,
)

log = logging.getLogger(__name__)

#: Logical CPUs of a local Ray started on demand (at least). Ray schedules by logical CPUs:
#: a Ray Train run holds one per worker plus its controller, Ray Data one per actor besides
#: its read tasks, Serve one per replica; the 2 real cores of a small machine could never
#: hold them as one slot each.
LOCAL_MIN_CPUS = 4


def init_ray(min_cpus: int = 0) -> bool:
    """Join the Ray cluster that the run context names, else start a private local Ray; a
    Ray that is already initialised is reused.

    The address rule: the run's address (:func:`mspray.config.run.current_run`: a Ray
    address, or ``"auto"`` for the one ``ray start`` runs here) or ``$RAY_ADDRESS`` (set
    inside ``ray job submit``) joins that cluster. Without either, a new local Ray is
    started with at least :data:`LOCAL_MIN_CPUS` (and ``min_cpus``) logical CPUs, never
    fewer than the machine's cores, even when a ``ray start`` head (or the address file a
    dead one left) is on this machine. With its dashboard: Ray Train's placement-group
    cleaner polls the state API, which lives there, and warns every second without it.

    The run's ``progress`` switches Ray Data's progress bars. Returns whether this call
    started a local Ray (its caller may then shut it down)."""
    import ray
    from ray.data import DataContext

    started = False
    if not ray.is_initialized():
        join = _address_to_join()
        if join:
            ray.init(address=join)
        else:
            cpus = max(LOCAL_MIN_CPUS, min_cpus, os.cpu_count() or 1)
            log.info("starting a private local Ray with %d logical CPUs", cpus)
            # "local": never the cluster Ray would otherwise find through its address file
            ray.init(address="local", num_cpus=cpus, include_dashboard=True)
            started = True
    DataContext.get_current().enable_progress_bars = current_run().progress
    return started


def _address_to_join() -> str | None:
    """The cluster :func:`init_ray` joins; None for a private local Ray."""
    join = current_run().address or os.environ.get("RAY_ADDRESS")
    return join if join and join != "local" else None


def node_local_refusal() -> str | None:
    """Why paths on this machine's disk cannot serve the Ray that :func:`init_ray` uses,
    None when they can: the cluster is this machine alone and its
    autoscaler has no worker node types (nodes that come up later could not see them
    either). A private local Ray (not started for the question) is this machine alone."""
    import ray

    if not ray.is_initialized():
        if _address_to_join() is None:
            return None
        init_ray()
    nodes = alive_node_records()
    if len(nodes) > 1:
        return f"the Ray cluster has {len(nodes)} nodes, whose workers cannot see it"
    if nodes and nodes[0].get("NodeManagerAddress") != ray.util.get_node_ip_address():
        return f"the Ray cluster runs on {nodes[0].get('NodeManagerAddress')}, not here"
    types = autoscaler_node_types()
    if types:
        names = ", ".join(sorted(k.name for k in types))
        return f"the Ray cluster's autoscaler can add worker nodes ({names}), which will not see it"
    return None


def this_machine(host: str) -> bool:
    """Whether ``host`` (a name or IP of a URL) is this machine."""
    import socket

    import ray

    if host in ("localhost", "127.0.0.1", "::1", ray.util.get_node_ip_address()):
        return True
    try:
        return socket.gethostbyname(host) in ("127.0.0.1", ray.util.get_node_ip_address())
    except OSError:
        return False


def ray_dashboard_url() -> str:
    """The dashboard address of the Ray that the run context names (joined as
    :func:`init_ray` does), ``""`` when that cluster runs without a dashboard."""
    import ray

    init_ray()
    # Once connected, ray.init returns the context of the existing connection.
    return ray.init(ignore_reinit_error=True).dashboard_url or ""


#: Most CPUs a GPU actor takes by default (its torch threads, decoding of map PNGs, the
#: host side of the search); half its node's CPUs per GPU, so decode tasks fit there too.
GPU_ACTOR_MAX_CPUS = 8
#: Actors a pool of GPU actors is planned for when a GPU node type has no upper bound.
UNBOUNDED_GPU_ACTORS = 8

#: Texts of hardware faults of a GPU: the process's CUDA context is unusable (every later
#: call fails too) but a new process may well succeed, so the actor exits and Ray restarts
#: it (at most :data:`ACTOR_RESTARTS` times) to retry its unit (at most
#: :data:`HARDWARE_RETRIES` times). Out of memory is not one: it passes once memory is freed.
HARDWARE_FAULTS = (
    "illegal memory access",
    "illegal address",
    "uncorrectable ECC",
    "ECC error",
    "Xid",
    "unspecified launch failure",
)
#: Texts of device errors that would happen again in any process (a kernel not built for
#: this GPU, an assertion in a kernel): never restarted, the unit's images become error rows.
DETERMINISTIC_DEVICE_ERRORS = (
    "no kernel image is available",
    "device-side assert",
    "CUDA error",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_EXECUTION_FAILED",
)
#: Times a unit is retried in a fresh process after a hardware fault on it; one more fault
#: and its images become error rows.
HARDWARE_RETRIES = 2
#: Restarts of one model actor (a node whose GPU keeps faulting stops getting processes);
#: Ray Data's default is unbounded.
ACTOR_RESTARTS = 4
#: Ray's retries of one unit's task on a restarted actor: every submission that meets the
#: actor mid-restart counts, so a few per restart.
TASK_RETRIES = 4 * (HARDWARE_RETRIES + 1)
#: Exit status of an actor that exits for a hardware fault.
DEVICE_FAILURE_EXIT = 70


class DeviceError(RuntimeError):
    """The device failed on a unit in a way a retry would not mend; the unit's images get
    error rows with this reason."""


@dataclass(frozen=True)
class ActorResources:
    """What one model actor reserves: CPUs (also its torch threads) and GPUs."""

    cpus: float
    gpus: float


Nodes = list[NodeKind] | list[dict[str, float]]


def _kinds(nodes: Nodes | None) -> list[NodeKind]:
    """``nodes`` as node kinds (plain resource dicts are one alive node each); default: what
    the connected cluster has and can have (:func:`mspray.ray.capacity.node_kinds`)."""
    if nodes is None:
        return node_kinds()
    return [n if isinstance(n, NodeKind) else NodeKind(dict(n)) for n in nodes]


def gpus_per_actor(
    pool: PoolConfig, cfg: MSPrayConfig | Iterable[MSPrayConfig], nodes: Nodes | None = None
) -> float:
    """GPUs per actor: the pool's setting, else one when the ``score.device`` of a model
    (``cfg``: one, or every model of a fleet) wants a GPU by :func:`mspray.device.wants_gpu`,
    with "a GPU is there" meaning a node of the cluster or a node type its autoscaler can
    launch has GPUs (``nodes``, default the connected cluster). What the bundle was trained
    on plays no part."""
    if pool.gpus_per_worker is not None:
        return float(pool.gpus_per_worker)
    kinds = _kinds(nodes)
    gpu_types = sorted({k.name for k in kinds if k.name and k.gpus > 0})
    there = any(k.gpus > 0 for k in kinds)
    settings = {c.score.device for c in ([cfg] if isinstance(cfg, MSPrayConfig) else cfg)}
    gpu = any(wants_gpu(s, there) for s in settings)
    if "auto" in settings and gpu and not any(k.gpus > 0 for k in kinds if not k.name):
        log.warning(
            "device auto: no GPU node is up yet, but the autoscaler can launch GPU nodes "
            "(%s): reserving a GPU per model actor, which brings them up",
            ", ".join(gpu_types),
        )
    elif "auto" in settings and not gpu:
        log.info("device auto: no node or node type of the cluster has GPUs: the CPU")
    return 1.0 if gpu else 0.0


def actor_resources(
    pool: PoolConfig, cfg: MSPrayConfig | Iterable[MSPrayConfig], nodes: Nodes | None = None
) -> ActorResources:
    """CPUs and GPUs of one model actor (see :func:`gpus_per_actor`; ``cfg``: every model of
    the pool). A GPU actor takes at least half of its node type's CPUs per GPU (up to
    :data:`GPU_ACTOR_MAX_CPUS`; the smallest share when GPU nodes differ, counting node types
    not launched yet), so one host thread does not starve the GPU."""
    kinds = _kinds(nodes)
    gpus = gpus_per_actor(pool, cfg, kinds)
    cpus = float(pool.cpus_per_worker)
    shares = [k.resources.get("CPU", 0) / k.gpus for k in kinds if k.gpus > 0]
    if gpus > 0 and shares:
        share = math.floor(min(shares) * gpus / 2)
        cpus = max(cpus, float(min(GPU_ACTOR_MAX_CPUS, share)))
    return ActorResources(cpus, gpus)


def concurrent_actors(
    pool: PoolConfig, res: ActorResources, spare_cpus: float = 0.0, nodes: Nodes | None = None
) -> int:
    """How many actors reserving ``res`` the connected cluster holds at once (at least one, at
    most ``pool.workers``), leaving ``spare_cpus`` for other tasks. GPU actors count the
    GPUs the cluster can have (its autoscaler's GPU node types too, see
    :func:`mspray.ray.capacity.possible_gpus`), CPU actors the CPUs it has now. On a
    one-node cluster on this machine (a private local Ray declares more logical CPUs than
    cores), actors × threads never exceed the machine's cores."""
    import ray

    if res.gpus > 0:
        gpus = possible_gpus(_kinds(nodes))
        n = UNBOUNDED_GPU_ACTORS if math.isinf(gpus) else int(gpus // res.gpus)
    else:
        n = int((ray.cluster_resources().get("CPU", 0) - spare_cpus) // res.cpus)
        if one_local_node():
            n = min(n, int((os.cpu_count() or 1) // res.cpus))
    n = max(1, n)
    return min(n, pool.workers) if pool.workers else n


def gpu_nodes_requested(res: ActorResources, actors: int) -> Any:
    """A context in which the autoscaler is asked for room for ``actors`` GPU actors of
    ``res`` (nothing for CPU actors; see :func:`mspray.ray.capacity.requested_nodes`)."""
    bundle = {"CPU": res.cpus, "GPU": res.gpus}
    return requested_nodes(bundle, actors if res.gpus > 0 else 0)


def one_local_node() -> bool:
    """Whether the connected cluster is one node with CPUs on this machine (the private
    local Ray, or a ``ray start --head`` here without workers): its logical CPUs may be more
    than the machine's cores. A lone head without CPUs is not one: work there waits for
    the nodes an autoscaler adds."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) != 1 or nodes[0]["Resources"].get("CPU", 0) <= 0:
        return False
    return nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()


def device_fault(e: BaseException) -> str | None:
    """``"hardware"`` when ``e`` is a hardware fault of the GPU (see :data:`HARDWARE_FAULTS`:
    a fresh process may succeed), ``"deterministic"`` for a device error that would happen
    again anywhere (:data:`DETERMINISTIC_DEVICE_ERRORS`), None for anything else (out of
    memory included)."""
    text = str(e)
    if not isinstance(e, RuntimeError) or "out of memory" in text:
        return None
    if type(e).__name__ == "OutOfMemoryError":
        return None
    if any(m in text for m in HARDWARE_FAULTS):
        return "hardware"
    if any(m in text for m in DETERMINISTIC_DEVICE_ERRORS):
        return "deterministic"
    return None


def count_fault(what: str, bump: bool = True) -> int:
    """Hardware faults recorded for ``what`` (a unit, a node), with this one when ``bump``.
    Kept in the cluster's GCS key-value store: the process that counts them dies of each."""
    from ray.experimental import internal_kv

    key = "fault:" + hashlib.sha1(what.encode()).hexdigest()
    n = int(internal_kv._internal_kv_get(key, namespace=FAULTS_NAMESPACE) or 0)
    if bump:
        n += 1
        internal_kv._internal_kv_put(key, str(n), overwrite=True, namespace=FAULTS_NAMESPACE)
    return n


#: Namespace of :func:`count_fault`'s records in the GCS key-value store.
FAULTS_NAMESPACE = "mspray"


def exit_for_restart(reason: str) -> NoReturn:
    """End this actor's process at once, so Ray starts a new one (``max_restarts``) and
    retries its task there; a process with a broken CUDA context would otherwise fail every
    unit it pulls. ``ray.actor.exit_actor`` would not do: Ray never restarts an actor that
    exits on purpose."""
    log.error("%s: exiting this actor so that Ray replaces it with a fresh process", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(DEVICE_FAILURE_EXIT)


def actor_pool(pool: PoolConfig, n_items: int) -> Any:
    """An autoscaling :class:`ray.data.ActorPoolStrategy`: ``min_workers`` actors while idle,
    growing with the work and the cluster up to ``workers`` (unbounded when unset, so new
    nodes of an autoscaling cluster are used), never more actors than work items."""
    from ray.data import ActorPoolStrategy

    top = max(1, n_items if pool.workers is None else min(pool.workers, n_items))
    return ActorPoolStrategy(min_size=min(pool.min_workers, top), max_size=top)


def where_am_i() -> tuple[str, str]:
    """(node id, actor id) of the calling Ray worker, for summaries that show where work ran."""
    import ray

    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), ctx.get_actor_id() or ""


class DetectorActor:
    """Base of every Ray Data stage that runs the model: loads the bundle once per actor.

    Runtime settings (bank, score) come from ``config_json``, the model from the bundle.
    Torch threads follow the CPUs the actor reserved (faiss follows torch), so actors on
    one node do not oversubscribe its cores. Subclasses implement ``__call__(batch)``.
    """

    #: Whether the stage needs the banks (embedding for a new bank does not).
    with_banks = True

    def __init__(
        self, bundle: str, config_json: str, cpus: float, gpus: float, io_threads: int = 0
    ) -> None:
        import torch

        from mspray.artifacts.bundle import load_bundle

        torch.set_num_threads(max(1, int(cpus)))
        cfg = MSPrayConfig.from_json(config_json)
        # a GPU only where this actor reserved one (Ray makes it the process's cuda:0) and
        # the scoring config allows it; resolve_device logs a CPU fallback ("GPU" node
        # without CUDA)
        on_gpu = gpus > 0 and wants_gpu(cfg.score.device, gpu=True)
        device = resolve_device("auto", gpu=on_gpu)
        self.det = load_bundle(bundle, device=device, with_banks=self.with_banks, config=cfg)
        self.io = (
            ThreadPoolExecutor(io_threads, thread_name_prefix="mspray-io") if io_threads else None
        )

    def check_device(self, e: BaseException, unit: Sequence[str] = ()) -> None:
        """Act on a device failure ``e`` while scoring ``unit`` (its paths): a hardware
        fault exits the actor (see :func:`exit_for_restart`) for Ray to retry the unit in a
        fresh process, until the unit has had :data:`HARDWARE_RETRIES` retries; then, and at
        once for a deterministic device error, :class:`DeviceError` is raised (the caller
        gives the unit's images error rows with its reason). A node whose GPU has failed a
        unit past its retries is not restarted on again: its later faults raise at once, so
        a dead GPU cannot exhaust the actor's restarts and end the run without a summary.
        The counts are per run (Ray job). Returns for anything else."""
        kind = device_fault(e)
        if kind is None:
            return
        what = f"{type(e).__name__} on {self.det.device}: {e}"
        if kind == "deterministic":
            raise DeviceError(f"device error, not retried (it would recur): {what}") from e
        import ray

        run = ray.get_runtime_context().get_job_id()  # the counts are this run's alone
        node = f"node:{run}:{where_am_i()[0]}"
        if count_fault(node, bump=False):
            raise DeviceError(f"hardware fault on a GPU that failed before: {what}") from e
        faults = count_fault(f"unit:{run}:" + "\n".join(unit))
        if faults > HARDWARE_RETRIES:
            count_fault(node)
            raise DeviceError(
                f"hardware fault {faults} times on this unit, given up after "
                f"{HARDWARE_RETRIES} retries in fresh processes: {what}"
            ) from e
        exit_for_restart(f"hardware fault ({faults} on this unit): {what}")


def map_with_detector(
    ds: Any,
    actor: type[DetectorActor],
    bundle: str,
    cfg: MSPrayConfig,
    pool: PoolConfig,
    *,
    n_items: int,
    batch_size: int,
    batch_format: str,
    io_threads: int = 0,
    resources: ActorResources | None = None,
    **kwargs: Any,
) -> Any:
    """``ds.map_batches`` with ``actor`` on an autoscaling actor pool (see :func:`actor_pool`),
    each actor reserving ``resources`` (default: :func:`actor_resources`); ``kwargs`` go to
    the actor's constructor after the :class:`DetectorActor` ones. An actor is restarted at
    most :data:`ACTOR_RESTARTS` times and a unit's task at most :data:`TASK_RETRIES` times
    (Ray Data's defaults retry for ever)."""
    res = resources or actor_resources(pool, cfg)
    reserve: dict[str, Any] = {
        "num_cpus": res.cpus,
        "max_restarts": ACTOR_RESTARTS,
        # bounded, with room for the submissions that fail while an actor restarts ("actor
        # temporarily unavailable" uses up a retry too); the unit itself is given up after
        # HARDWARE_RETRIES faults by its own count (see DetectorActor.check_device)
        "max_task_retries": TASK_RETRIES,
    }
    if res.gpus > 0:
        reserve["num_gpus"] = res.gpus
    with warnings.catch_warnings():
        # Ray 2.60 deprecates extra remote args, yet has no named parameter for the restart
        # bounds (its own comment says to pass max_restarts this way)
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        return ds.map_batches(
            actor,
            batch_size=batch_size,
            batch_format=batch_format,
            fn_constructor_kwargs={
                "bundle": bundle,
                "config_json": cfg.to_json(),
                "cpus": res.cpus,
                "gpus": res.gpus,
                "io_threads": io_threads,
                **kwargs,
            },
            compute=actor_pool(pool, n_items),
            **reserve,
        )
