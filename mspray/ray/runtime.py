"""Where Ray work runs: the one Ray start-up, actor-pool options, and the detector actor.

Every Ray entry point (Train, the Data pipelines, Serve, deploy) starts or joins Ray through
:func:`init_ray`, and every Ray Data stage that needs the model subclasses
:class:`DetectorActor` and is added to a dataset with :func:`map_with_detector`.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mspray.config import MSPrayConfig, PoolConfig

log = logging.getLogger(__name__)

#: Logical CPUs of a local Ray started on demand (at least). Ray schedules by logical CPUs:
#: a Ray Train run holds one per worker plus its controller, Ray Data one per actor besides
#: its read tasks, Serve one per replica; the 2 real cores of a small machine could never
#: hold them as one slot each.
LOCAL_MIN_CPUS = 4


def init_ray(address: str | None = None, progress: bool = True, min_cpus: int = 0) -> bool:
    """Connect to ``address`` (or ``$RAY_ADDRESS``, as under ``ray job submit``), else start
    a local Ray with at least :data:`LOCAL_MIN_CPUS` (and ``min_cpus``) logical CPUs, never
    fewer than the machine's cores. A Ray that is already
    initialised is reused. ``progress`` switches Ray Data's progress bars. Returns whether
    this call started a local Ray (its caller may then shut it down)."""
    import ray
    from ray.data import DataContext

    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        elif os.environ.get("RAY_ADDRESS"):
            ray.init()  # picks up RAY_ADDRESS
        else:
            cpus = max(LOCAL_MIN_CPUS, min_cpus, os.cpu_count() or 1)
            log.info("starting a local Ray with %d logical CPUs", cpus)
            ray.init(num_cpus=cpus, include_dashboard=False)
            started = True
    DataContext.get_current().enable_progress_bars = progress
    return started


def ray_dashboard_url(address: str | None = None) -> str:
    """The dashboard address of the Ray that ``address`` names (joined as :func:`init_ray`
    does), ``""`` when that cluster runs without a dashboard."""
    import ray

    init_ray(address, progress=False)
    # Once connected, ray.init returns the context of the existing connection.
    return ray.init(ignore_reinit_error=True).dashboard_url or ""


def gpus_per_actor(pool: PoolConfig, cfg: MSPrayConfig) -> float:
    """GPUs per actor: the pool's setting, else one when the config asks for GPU work."""
    if pool.gpus_per_worker is not None:
        return float(pool.gpus_per_worker)
    return 1.0 if (cfg.bank.use_gpu or cfg.train.use_gpu) else 0.0


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


def bundle_config(bundle: str, overrides: dict[str, Any] | None = None) -> MSPrayConfig:
    """Kept for callers not yet switched: :func:`mspray.bundle.load_config`."""
    from mspray.bundle import load_config

    return load_config(bundle, overrides)


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
        # a GPU only where this actor reserved one; resolve_device logs a CPU fallback
        device = resolve_device("cuda" if gpus > 0 else "cpu")
        cfg = MSPrayConfig.from_json(config_json)
        self.det = load_bundle(bundle, device=device, with_banks=self.with_banks, config=cfg)
        self.io = (
            ThreadPoolExecutor(io_threads, thread_name_prefix="mspray-io") if io_threads else None
        )


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
    **kwargs: Any,
) -> Any:
    """``ds.map_batches`` with ``actor`` on an autoscaling actor pool (see :func:`actor_pool`);
    ``kwargs`` go to the actor's constructor after the :class:`DetectorActor` ones."""
    gpus = gpus_per_actor(pool, cfg)
    resources: dict[str, Any] = {"num_cpus": pool.cpus_per_worker}
    if gpus > 0:
        resources["num_gpus"] = gpus
    return ds.map_batches(
        actor,
        batch_size=batch_size,
        batch_format=batch_format,
        fn_constructor_kwargs={
            "bundle": bundle,
            "config_json": cfg.to_json(),
            "cpus": pool.cpus_per_worker,
            "gpus": gpus,
            "io_threads": io_threads,
            **kwargs,
        },
        compute=actor_pool(pool, n_items),
        **resources,
    )
