"""Ray Train adapter: each scale's encoder trained data-parallel (DDP) by the core loop.

This is a thin layer over :class:`mspray.train.loop.ScaleTrainer`; it adds only what Ray
gives: worker processes (gloo on CPU; ``cpu:gloo,cuda:nccl`` with GPUs, so host-side
collectives stay valid), per-rank sharding of the image list,
per-epoch checkpoints through ``ray.train.report``, and restarts after worker failures.

- Every worker loads ``uris[rank::world_size]``; the core seeds sampling by (seed, scale,
  epoch, rank) and uses a per-rank batch of ``batch_size // world_size``, so the global
  batch is the configured one.
- K-means centers come from ``fit_centers(..., TorchDistComm(device))``: k-means++ on rank 0
  over an all-gathered sample, broadcast, then Lloyd sums/counts all-reduced; every worker
  ends with the same centers.
- Rank 0 writes the trainer state (model, optimizer, centers, epoch, best model, history,
  torch RNG) with ``torch.save`` after every epoch and waits until Ray Train has committed
  it; a restarted worker group, or a rerun with the same run name and storage, continues
  from the latest one. The state holds only
  tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``.
- ``epoch_hook``: a picklable callable every worker calls after finishing an epoch and
  before its checkpoint is reported, ``hook(epoch=, rank=, world_size=)``. The tests'
  fault injection (``tests/ray/fault_hooks.py``) goes through it; production passes none.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

import mspray.storage as store
from mspray.config import MSPrayConfig
from mspray.config.run import current_run, use_run
from mspray.model.multiscale import (
    ScaleModel,
    build_scale_model,
    stem_scale,
    stem_state,
    training_order,
)
from mspray.ray.runtime import init_ray
from mspray.train.loop import ScaleTrainer, run_summary
from mspray.train.sampling import ssl_skip_reason

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
RUN_FILE = "mspray_run.json"

# Fields that may change between a run and its resumption: they do not change what the
# saved state means (more epochs continue training; worker count only changes the draws).
_RESUMABLE_CHANGES = {
    "train.epochs",
    "train.workers",
    "train.use_gpu",
    "train.device",
    "train.storage",
    "train.max_failures",
    "train.parallel_scales",
    # A step budget only says where to stop: raising it continues the same run.
    "train.max_steps",
}


def torch_backend(use_gpu: bool) -> str:
    """``torch.distributed`` backend for Ray Train workers.

    With GPUs, NCCL serves CUDA tensors (DDP gradients) and gloo any CPU tensor handed to a
    collective, so no collective can fail for being on the host; ``TorchDistComm`` still
    puts its tensors on the group's device (:func:`mspray.train.kmeans.collective_device`).
    """
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def default_storage_for(bundle_uri: str) -> str:
    """Checkpoint storage next to a bundle: ``<bundle>.ray_runs`` (local or s3://)."""
    return store.normalize(bundle_uri).rstrip("/") + ".ray_runs"


def run_location(root: str) -> dict[str, Any]:
    """``RunConfig`` arguments that put a Ray Train run under ``root`` (local or remote)."""
    if store.is_local(root):
        return {"storage_path": root}
    fs, path = store.filesystem(root)
    return {"storage_path": path, "storage_filesystem": fs}


def new_run_name() -> str:
    return f"mspray-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _abs_uri(uri: str) -> str:
    # Ray Train workers chdir into the run folder, so relative paths would break there.
    return store.normalize(uri)


def _config_fingerprint(cfg: MSPrayConfig) -> dict[str, Any]:
    data = json.loads(cfg.to_json())
    for key in _RESUMABLE_CHANGES:
        section, _, name = key.partition(".")
        data[section].pop(name, None)
    return {"model": data["model"], "train": data["train"]}


# ---------------------------------------------------------------------------- worker side
def _checkpoint_state(tr: ScaleTrainer) -> dict[str, Any]:
    state = tr.state_dict()
    state["torch_rng"] = torch.get_rng_state()
    return state


def load_state(checkpoint: Any) -> dict[str, Any]:
    """The trainer state stored in a Ray ``Checkpoint`` (local or remote storage)."""
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker function: train one scale with the core loop under DDP, in the
    driver's run context (``config["run"]``)."""
    with use_run(config["run"]):
        _train_worker(config)


def _train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from mspray.data.images import load_images
    from mspray.train.kmeans import LocalComm, TorchDistComm

    cfg = MSPrayConfig.from_dict(config["cfg"])
    scale = int(config["scale"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # One intra-op thread per reserved CPU: workers sharing a node must not oversubscribe it.
    torch.set_num_threads(max(1, int(config.get("threads", 1))))

    # through the object store: ImageNet weights, and the shared stem trained by its scale
    vgg_state, stem = (
        None if config.get(k) is None else ray.get(config[k]) for k in ("vgg_ref", "stem_ref")
    )
    device = ray.train.torch.get_device()
    # A skipped SSL term (its pairs would leak the angle at this size) leaves the angle
    # head without gradients: DDP must expect unused parameters then.
    size, losses = cfg.model.image_size, cfg.train.losses
    unused = "ssl" in losses and losses != ("ssl",) and ssl_skip_reason(size, size, scale)
    model = ray.train.torch.prepare_model(
        build_scale_model(cfg, scale, vgg_state, stem),
        parallel_strategy_kwargs={"find_unused_parameters": True} if unused else None,
    )
    ddp = dist.is_available() and dist.is_initialized()
    comm = TorchDistComm(device) if ddp else LocalComm()
    tr = ScaleTrainer(cfg, scale, model, device, comm)

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        state = load_state(ckpt)
        tr.load_state_dict(state)
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        if rank == 0:
            log.info("scale %d: resuming after epoch %d", scale, tr.epoch)
    start_epoch = tr.epoch

    train_uris = config["train_uris"][rank::world]
    val_uris = config["val_uris"][rank::world]
    # Synthetic-anomaly selection runs on rank 0 over all held-out images (the others wait
    # in its collective): an AUROC cannot be summed over shards. One worker's share is all
    # of them (``select`` None: fit selects on ``val``).
    select = None
    with use_run(progress=False):
        train = load_images(train_uris, size)
        val = load_images(val_uris, size) if config["val_uris"] else None
        if rank == 0 and world > 1 and config["val_uris"]:
            select = load_images(config["val_uris"], size)

    def on_epoch_end(t: ScaleTrainer, metrics: dict[str, float]) -> None:
        # ``metrics`` is also the history entry: recording the attempt's first epoch there
        # shows in the final state which epochs were redone after a restart.
        metrics["start_epoch"] = start_epoch
        hook = config.get("epoch_hook")
        if hook is not None:
            hook(epoch=t.epoch, rank=rank, world_size=world)
        report = {**metrics, "scale": scale, "world_size": world}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:  # DDP keeps every rank's state identical: one writer is enough
                torch.save(_checkpoint_state(t), os.path.join(d, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            # Every rank calls report (it is a barrier); the upload is synchronous, so the
            # temporary folder may go away afterwards.
            ray.train.report(report, checkpoint=checkpoint)
        if rank == 0:
            # report() returns once the files are uploaded, but the controller registers
            # the checkpoint (and writes the run snapshot a rerun resumes from) only at its
            # next poll, up to ~2 s later: wait for that, or a crash right now would lose
            # this epoch even though its files are in storage.
            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
            )

    tr.fit(train, val, on_epoch_end=on_epoch_end, select_images=select)


# ---------------------------------------------------------------------------- driver side
@dataclass
class RayScaleTrainer:
    """Trains every scale with Ray Train (the train step of
    :class:`mspray.ray.executor.RayExecutor`).

    What to train with (workers, GPUs, failures allowed, scales in parallel, storage) is the
    config's ``train`` section; these fields are what only this run has. ``results`` holds
    each scale's Ray ``Result`` after a call (metrics, checkpoint paths).
    """

    run_name: str | None = None
    #: checkpoint root (default: ``cfg.train.storage``, else ``~/ray_results``)
    storage: str | None = None
    cpus_per_worker: float = 1.0
    keep_checkpoints: int | None = 2
    #: Called on every worker after each epoch, before its checkpoint (see module docstring).
    epoch_hook: Callable[..., None] | None = None
    results: dict[int, Any] = field(default_factory=dict)

    def __call__(
        self,
        cfg: MSPrayConfig,
        train_uris: Sequence[str],
        val_uris: Sequence[str],
        vgg_state: dict | None = None,
    ) -> dict[int, ScaleModel]:
        """Every scale's trained model from the trunk weights ``vgg_state`` (None: random
        init), loaded once by the pipeline's split step."""
        import ray

        t = cfg.train
        workers = max(1, t.workers)
        if len(train_uris) < workers:
            log.warning(
                "%d training images for %d workers: using %d workers",
                len(train_uris),
                workers,
                len(train_uris),
            )
            workers = max(1, len(train_uris))
        n_parallel = len(cfg.model.scales) if t.parallel_scales else 1
        init_ray(min_cpus=n_parallel * (workers + 1) + 1)
        if self.run_name is None:
            self.run_name = new_run_name()
            log.info("Ray Train run name %s (pass it again to resume this run)", self.run_name)
        root = self.storage or t.storage
        root = _abs_uri(root) if root else os.path.expanduser("~/ray_results")

        # Through the object store: workers on other nodes may not have the weights file.
        vgg_ref = ray.put(vgg_state) if vgg_state is not None else None
        train_uris = [_abs_uri(u) for u in train_uris]
        val_uris = [_abs_uri(u) for u in val_uris]

        if t.epochs == 0:  # nothing to train: the initial encoders, as the core does
            return {s: build_scale_model(cfg, s, vgg_state) for s in cfg.model.scales}

        models: dict[int, ScaleModel] = {}
        stem_ref = None
        first = stem_scale(cfg)
        if first is not None:  # the shared stem trains with its scale, before the others
            models[first] = self._train_scale(
                cfg, first, train_uris, val_uris, workers, root, vgg_ref, None
            )
            stem_ref = ray.put(stem_state(models[first]))

        def one(scale: int) -> tuple[int, ScaleModel]:
            return scale, self._train_scale(
                cfg, scale, train_uris, val_uris, workers, root, vgg_ref, stem_ref
            )

        rest = [s for s in training_order(cfg) if s not in models]
        if n_parallel > 1 and len(rest) > 1:
            with ThreadPoolExecutor(max_workers=len(rest)) as pool:
                models.update(pool.map(one, rest))
        else:
            models.update(one(s) for s in rest)
        return models

    def run_dir(self, root: str, scale: int) -> str:
        return store.join(root, f"{self.run_name}-s{scale}")

    def _check_run(self, cfg: MSPrayConfig, run_dir: str) -> None:
        """Refuse to resume a run saved with an incompatible config; record it otherwise."""
        path = store.join(run_dir, RUN_FILE)
        mine = _config_fingerprint(cfg)
        if store.exists(path):
            saved = json.loads(store.read_text(path))
            if saved != mine:
                raise ValueError(
                    f"run {run_dir} was started with a different model/training config; "
                    "use another run name (only epochs, workers, device and storage may "
                    "change on resume)"
                )
        else:
            store.makedirs(run_dir)
            store.write_text(path, json.dumps(mine, indent=2, sort_keys=True))

    def _train_scale(
        self,
        cfg: MSPrayConfig,
        scale: int,
        train_uris: list[str],
        val_uris: list[str],
        workers: int,
        root: str,
        vgg_ref: Any,
        stem_ref: Any,
    ) -> ScaleModel:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        t = cfg.train
        run_dir = self.run_dir(root, scale)
        self._check_run(cfg, run_dir)
        name = f"{self.run_name}-s{scale}"
        location = run_location(root)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={
                "cfg": cfg.to_dict(),
                "scale": scale,
                "train_uris": train_uris,
                "val_uris": val_uris,
                "vgg_ref": vgg_ref,
                "stem_ref": stem_ref,
                "epoch_hook": self.epoch_hook,
                "threads": self.cpus_per_worker,
                # progress bars (epochs, steps) from rank 0 only, forwarded by Ray to the
                # driver's log; contextvars do not reach the workers
                "run": current_run(),
            },
            torch_config=TorchConfig(backend=torch_backend(t.use_gpu)),
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=t.use_gpu,
                resources_per_worker={"CPU": self.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=name,
                **location,
                failure_config=FailureConfig(max_failures=t.max_failures),
                # The latest checkpoints are kept (a restart loads the last one); each
                # carries the selected weights so far, which the driver uses.
                checkpoint_config=CheckpointConfig(num_to_keep=self.keep_checkpoints),
            ),
        )
        t0 = time.perf_counter()
        result = trainer.fit()  # raises TrainingFailedError once max_failures is spent
        self.results[scale] = result
        if result.checkpoint is None:
            raise RuntimeError(f"scale {scale}: the Ray Train run reported no checkpoint")
        state = load_state(result.checkpoint)
        model = build_scale_model(cfg, scale, None)
        model.load_state_dict(state["best_state"] or state["model"])
        model.train_summary = run_summary(state["history"], cfg, state.get("candidates"), scale)
        last = state["history"][-1] if state["history"] else {}
        log.info(
            "scale %d: %d epochs on %d workers in %.0f s; loss %.4f, epoch %d selected",
            scale,
            state["epoch"],
            workers,
            time.perf_counter() - t0,
            last.get("loss", float("nan")),
            state.get("best_epoch", 0),
        )
        return model


def ray_scale_trainer(
    run_name: str | None = None,
    storage: str | None = None,
    **kwargs: Any,
) -> RayScaleTrainer:
    """The Ray Train scale trainer of a :class:`mspray.ray.executor.RayExecutor`.

    ``run_name``: rerunning with the same name and ``storage`` resumes from the last
    checkpoint (default: a new name). ``storage``: local path or s3:// for checkpoints
    (default: ``cfg.train.storage``, else ``~/ray_results``). Other keyword arguments are
    :class:`RayScaleTrainer` fields.
    """
    return RayScaleTrainer(run_name=run_name, storage=storage, **kwargs)
