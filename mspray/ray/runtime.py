"""Where Ray work runs: the one Ray start-up, actor-pool options, and the detector actor.

Every Ray entry point (Train, the Data pipelines, Serve, deploy) starts or joins Ray through
:func:`init_ray`, and every Ray Data stage that needs the model subclasses
:class:`DetectorActor` and is added to a dataset with :func:`map_with_detector`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

from mspray.config import MSPrayConfig, PoolConfig

log = logging.getLogger(__name__)

#: Logical CPUs of a local Ray started on demand (at least). Ray schedules by logical CPUs:
#: a Ray Train run holds one per worker plus its controller, Ray Data one per actor besides
#: its read tasks, Serve one per replica; the 2 real cores of a small machine could never
#: hold them as one slot each.
LOCAL_MIN_CPUS = 4


def init_ray(address: str | None = None, progress: bool = True, min_cpus: int = 0) -> bool:
    """Join the Ray cluster that ``address`` or ``$RAY_ADDRESS`` names, else start a private
    local Ray; a Ray that is already initialised is reused.

    The address rule: ``address`` (a Ray address, or ``"auto"`` for the cluster that ``ray
    start`` runs on this machine) or ``$RAY_ADDRESS`` (set inside ``ray job submit``) joins
    that cluster. Without either, a new local Ray is started with at least
    :data:`LOCAL_MIN_CPUS` (and ``min_cpus``) logical CPUs, never fewer than the machine's
    cores, even when a ``ray start`` head (or the address file a dead one left) is on this
    machine. It runs with its dashboard: Ray Train's placement-group cleaner polls the state
    API, which lives there, and warns every second without it.

    ``progress`` switches Ray Data's progress bars. Returns whether this call started a
    local Ray (its caller may then shut it down)."""
    import ray
    from ray.data import DataContext

    started = False
    if not ray.is_initialized():
        join = _address_to_join(address)
        if join:
            ray.init(address=join)
        else:
            cpus = max(LOCAL_MIN_CPUS, min_cpus, os.cpu_count() or 1)
            log.info("starting a private local Ray with %d logical CPUs", cpus)
            # "local": never the cluster Ray would otherwise find through its address file
            ray.init(address="local", num_cpus=cpus, include_dashboard=True)
            started = True
    DataContext.get_current().enable_progress_bars = progress
    return started


def _address_to_join(address: str | None) -> str | None:
    """The cluster :func:`init_ray` joins for ``address``; None for a private local Ray."""
    join = address or os.environ.get("RAY_ADDRESS")
    return join if join and join != "local" else None


def alive_nodes(address: str | None = None) -> int:
    """Alive nodes of the Ray that :func:`init_ray` (``address``) uses: the connected one,
    else the cluster it would join (joined here), else 1 (a private local Ray, not started
    for the question)."""
    import ray

    if not ray.is_initialized():
        if _address_to_join(address) is None:
            return 1
        init_ray(address, progress=False)
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def ray_dashboard_url(address: str | None = None) -> str:
    """The dashboard address of the Ray that ``address`` names (joined as :func:`init_ray`
    does), ``""`` when that cluster runs without a dashboard."""
    import ray

    init_ray(address, progress=False)
    # Once connected, ray.init returns the context of the existing connection.
    return ray.init(ignore_reinit_error=True).dashboard_url or ""


#: Most CPUs a GPU actor takes by default (its torch threads, decoding of map PNGs, the
#: host side of the search); half its node's CPUs per GPU, so decode tasks fit there too.
GPU_ACTOR_MAX_CPUS = 8

#: Texts of CUDA failures after which the process's CUDA context is unusable (the error is
#: sticky: every later call fails too), so only a new process recovers. Out of memory is
#: not one of them: it passes once memory is freed.
LASTING_DEVICE_FAILURES = (
    "CUDA error",
    "illegal memory access",
    "uncorrectable ECC",
    "ECC error",
    "Xid",
    "unspecified launch failure",
    "device-side assert",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_EXECUTION_FAILED",
)
#: Exit status of an actor that exits for a lasting device failure.
DEVICE_FAILURE_EXIT = 70


@dataclass(frozen=True)
class ActorResources:
    """What one model actor reserves: CPUs (also its torch threads) and GPUs."""

    cpus: float
    gpus: float


def _alive_nodes() -> list[dict[str, float]]:
    """Logical resources of every alive node of the connected cluster (none without Ray)."""
    import ray

    if not ray.is_initialized():
        return []
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def gpus_per_actor(
    pool: PoolConfig, cfg: MSPrayConfig, nodes: list[dict[str, float]] | None = None
) -> float:
    """GPUs per actor: the pool's setting, else from ``score.device`` (``auto``: one when a
    node of the cluster, ``nodes`` by default the connected one, has GPUs). What the bundle
    was trained on plays no part."""
    if pool.gpus_per_worker is not None:
        return float(pool.gpus_per_worker)
    if cfg.score.device == "auto":
        nodes = _alive_nodes() if nodes is None else nodes
        return 1.0 if any(n.get("GPU", 0) > 0 for n in nodes) else 0.0
    return 1.0 if cfg.score.device == "cuda" else 0.0


def actor_resources(
    pool: PoolConfig, cfg: MSPrayConfig, nodes: list[dict[str, float]] | None = None
) -> ActorResources:
    """CPUs and GPUs of one model actor (see :func:`gpus_per_actor`). A GPU actor takes at
    least half of its node type's CPUs per GPU (up to :data:`GPU_ACTOR_MAX_CPUS`; the
    smallest share when GPU nodes differ), so one host thread does not starve the GPU."""
    nodes = _alive_nodes() if nodes is None else nodes
    gpus = gpus_per_actor(pool, cfg, nodes)
    cpus = float(pool.cpus_per_worker)
    shares = [n.get("CPU", 0) / n["GPU"] for n in nodes if n.get("GPU", 0) > 0]
    if gpus > 0 and shares:
        share = math.floor(min(shares) * gpus / 2)
        cpus = max(cpus, float(min(GPU_ACTOR_MAX_CPUS, share)))
    return ActorResources(cpus, gpus)


def concurrent_actors(pool: PoolConfig, res: ActorResources, spare_cpus: float = 0.0) -> int:
    """How many actors reserving ``res`` the connected cluster holds at once now (at least
    one, at most ``pool.workers``), leaving ``spare_cpus`` for other tasks. On a one-node
    cluster on this machine (a private local Ray declares more logical CPUs than cores),
    actors × threads never exceed the machine's cores."""
    import ray

    total = ray.cluster_resources()
    if res.gpus > 0:
        n = int(total.get("GPU", 0) // res.gpus)
    else:
        n = int((total.get("CPU", 0) - spare_cpus) // res.cpus)
        if one_local_node():
            n = min(n, int((os.cpu_count() or 1) // res.cpus))
    n = max(1, n)
    return min(n, pool.workers) if pool.workers else n


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


def is_lasting_device_failure(e: BaseException) -> bool:
    """Whether ``e`` says the process's CUDA context is broken for good (see
    :data:`LASTING_DEVICE_FAILURES`)."""
    text = str(e)
    if type(e).__name__ == "OutOfMemoryError" or "out of memory" in text:
        return False
    return isinstance(e, RuntimeError) and any(m in text for m in LASTING_DEVICE_FAILURES)


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

        from mspray.bundle import load_bundle
        from mspray.device import resolve_device

        torch.set_num_threads(max(1, int(cpus)))
        cfg = MSPrayConfig.from_json(config_json)
        # a GPU only where this actor reserved one and the scoring config allows it;
        # resolve_device logs a CPU fallback ("GPU" node without CUDA)
        on_gpu = gpus > 0 and cfg.score.device != "cpu"
        device = resolve_device("cuda" if on_gpu else "cpu")
        self.det = load_bundle(bundle, device=device, with_banks=self.with_banks, config=cfg)
        self.io = (
            ThreadPoolExecutor(io_threads, thread_name_prefix="mspray-io") if io_threads else None
        )

    def check_device(self, e: BaseException) -> None:
        """Exit the actor (see :func:`exit_for_restart`) if ``e`` is a lasting device
        failure; return otherwise, for the caller's own retries."""
        if is_lasting_device_failure(e):
            exit_for_restart(f"lasting device failure on {self.det.device}: {e}")


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
    the actor's constructor after the :class:`DetectorActor` ones."""
    res = resources or actor_resources(pool, cfg)
    reserve: dict[str, Any] = {"num_cpus": res.cpus}
    if res.gpus > 0:
        reserve["num_gpus"] = res.gpus
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
