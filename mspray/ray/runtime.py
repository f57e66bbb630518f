"""Where the pipelines run: Ray start-up, actor pool sizing, and the detector of a worker."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from mspray.config import MSPrayConfig

log = logging.getLogger(__name__)

#: Logical CPUs of a local Ray started on demand. Ray Data runs actors *and* tasks at once,
#: which the 2 real cores of a small machine could never hold as one slot each.
LOCAL_MIN_CPUS = 4


def init_ray(address: str | None = None, progress: bool = True) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``, as under ``ray job submit``), else start
    a local Ray with at least :data:`LOCAL_MIN_CPUS` logical CPUs. A Ray that is already
    initialised is reused. ``progress`` switches Ray Data's progress bars."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        elif os.environ.get("RAY_ADDRESS"):
            ray.init()  # picks up RAY_ADDRESS
        else:
            cpus = max(LOCAL_MIN_CPUS, os.cpu_count() or 1)
            log.info("starting a local Ray with %d logical CPUs", cpus)
            ray.init(num_cpus=cpus, include_dashboard=False)
    DataContext.get_current().enable_progress_bars = progress


@dataclass
class PoolOptions:
    """Actor pool of a pipeline: how many actors and what each one reserves.

    ``workers=None`` sizes the pool from the cluster: one actor per GPU when actors use
    GPUs, else one per ``cpus_per_worker`` CPUs minus one CPU left for Ray Data's own tasks.
    """

    workers: int | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0

    def size(self, n_items: int) -> int:
        """Pool size for ``n_items`` work items (never more actors than items)."""
        n = self.workers if self.workers else _cluster_workers(self)
        return max(1, min(n, n_items))

    def map_batches_args(self, n_items: int) -> dict[str, Any]:
        """``compute`` / ``num_cpus`` / ``num_gpus`` arguments of ``Dataset.map_batches``."""
        from ray.data import ActorPoolStrategy

        args: dict[str, Any] = {
            "compute": ActorPoolStrategy(size=self.size(n_items)),
            "num_cpus": self.cpus_per_worker,
        }
        if self.gpus_per_worker > 0:
            args["num_gpus"] = self.gpus_per_worker
        return args


def _cluster_workers(opts: PoolOptions) -> int:
    import ray

    res = ray.cluster_resources()
    if opts.gpus_per_worker > 0:
        return max(1, int(res.get("GPU", 0) // opts.gpus_per_worker))
    return max(1, int((res.get("CPU", 1) - 1) // max(opts.cpus_per_worker, 1e-3)))


def default_gpus(cfg: MSPrayConfig, flag: float | None) -> float:
    """GPUs per actor: the flag when given, else one when the config asks for GPU work."""
    if flag is not None:
        return float(flag)
    return 1.0 if (cfg.bank.use_gpu or cfg.train.use_gpu) else 0.0


def bundle_config(bundle: str, overrides: dict[str, Any] | None = None) -> MSPrayConfig:
    """The bundle's own (verified) config.json, with dotted ``overrides`` (e.g.
    ``bank.coreset_ratio``); ``bundle`` is a version or a root (see
    :func:`mspray.bundle.resolve_bundle`)."""
    from mspray.bundle import read_config

    cfg = read_config(bundle)
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    return cfg.replace(**over) if over else cfg


def worker_setup(cpus: float, gpus: float) -> str:
    """Per-actor set-up: torch threads = the CPUs the actor reserved (faiss follows torch),
    so actors on one node do not oversubscribe its cores. Returns the torch device."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def load_worker_detector(
    bundle: str, config_json: str, cpus: float, gpus: float, with_banks: bool = True
):
    """The detector of one actor, loaded once in its ``__init__``; runtime settings (bank,
    score) come from ``config_json``, the model shape from the bundle."""
    from mspray.bundle import load_bundle

    device = worker_setup(cpus, gpus)
    cfg = MSPrayConfig.from_json(config_json)
    return load_bundle(bundle, device=device, with_banks=with_banks, config=cfg)
