"""Ray Train adapter of stage one (:mod:`mspray.train.stage_one`): the trunk trained
data-parallel (DDP) on Ray Train workers, the same core function as in one process.

As :mod:`mspray.ray.train` does for the scales: gloo on CPU (``cpu:gloo,cuda:nccl`` with
GPUs), every worker loads ``uris[rank::world_size]`` and draws its crops seeded by (seed,
step, rank), ``ray.train.torch.prepare_model`` wraps the model in DDP so every step
averages the gradients, and rank 0 reports the trained trunk as the run's checkpoint. The
trunk to start from (ImageNet's or none) travels through the object store.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import torch

import mspray.storage as store
from mspray.config import MSPrayConfig
from mspray.config.run import current_run, use_run
from mspray.ray.runtime import init_ray
from mspray.ray.train import new_run_name, run_location, torch_backend

log = logging.getLogger(__name__)

TRUNK_FILE = "stage_one.pt"


def stage_one_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker function: stage one on this rank's share of the images, in the
    driver's run context (``config["run"]``)."""
    with use_run(config["run"]):
        _stage_one_worker(config)


def _stage_one_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from mspray.data.images import load_images
    from mspray.train.stage_one import train_stage_one

    cfg = MSPrayConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    with use_run(progress=False):
        images = load_images(config["uris"][rank::world], cfg.model.image_size)
    trunk = None if config.get("trunk_ref") is None else ray.get(config["trunk_ref"])
    state, summary = train_stage_one(
        cfg,
        images,
        trunk,
        ray.train.torch.get_device(),
        rank=rank,
        wrap=ray.train.torch.prepare_model,
    )
    summary["workers"] = world
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:  # DDP keeps every rank's weights identical: one writer is enough
            torch.save({"trunk": state, "summary": summary}, os.path.join(d, TRUNK_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"loss_last": summary["loss_last"]}, checkpoint=checkpoint)


def ray_stage_one(
    cfg: MSPrayConfig,
    uris: list[str],
    trunk_state: dict[str, torch.Tensor] | None = None,
    workers: int | None = None,
    storage: str | None = None,
    cpus_per_worker: float = 1.0,
) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`mspray.train.stage_one.train_stage_one` on ``workers`` Ray Train DDP workers
    (default ``cfg.train.workers``, at least 1) over the training images ``uris``; returns
    the trained ``features.*`` tensors and the summary. ``storage``: where Ray Train keeps
    the run (default ``cfg.train.storage``, else ``~/ray_results``)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    workers = max(1, min(workers if workers is not None else t.workers, len(uris)))
    init_ray(min_cpus=workers + 2)
    root = storage or t.storage
    root = store.normalize(root) if root else os.path.expanduser("~/ray_results")
    location = run_location(root)
    trainer = TorchTrainer(
        stage_one_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "uris": [store.normalize(u) for u in uris],
            "trunk_ref": None if trunk_state is None else ray.put(trunk_state),
            "threads": cpus_per_worker,
            "run": current_run(),  # contextvars do not reach the workers
        },
        torch_config=TorchConfig(backend=torch_backend(t.use_gpu)),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(name=f"{new_run_name()}-stage-one", **location),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("stage one: the Ray Train run reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        saved = torch.load(os.path.join(d, TRUNK_FILE), map_location="cpu", weights_only=True)
    log.info("stage one on %d workers: %s", workers, saved["summary"])
    return saved["trunk"], saved["summary"]
