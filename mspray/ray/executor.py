"""The pipeline's heavy steps on Ray: an executor over the same core calls.

:class:`RayExecutor` implements :class:`mspray.pipeline.executor.Executor`: Ray Train (DDP)
trains the scales, a Ray task runs the fused selection check on a worker, a Ray Data actor
pool embeds the bank images and scores the calibration images, and one Ray task per scale
runs the global coreset. The driver never holds the images. The order of the steps, and
every decision between them, stays in :mod:`mspray.pipeline.steps`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from mspray.config import MSPrayConfig, PoolConfig
from mspray.config.run import RunContext, current_run, use_run
from mspray.decisions.calibration import FoldBankConfig
from mspray.decisions.threshold import Calibration
from mspray.detector import Detector
from mspray.model.multiscale import ScaleModel
from mspray.pipeline.executor import Candidates, Embeddings, LocalExecutor
from mspray.ray.data.banks import embed_images, global_coreset
from mspray.ray.data.calibration import calibrate_on_pool
from mspray.ray.runtime import gpus_per_actor, init_ray
from mspray.ray.train import RayScaleTrainer

log = logging.getLogger(__name__)


def _select_on_worker(
    run: RunContext,
    cfg: MSPrayConfig,
    candidates: Candidates,
    train_uris: list[str],
    val_uris: list[str],
) -> tuple[str, dict[str, dict]]:
    """Ray task: the in-process selection check, on a worker (its images decoded there),
    in the driver's run context ``run`` (contextvars do not cross into Ray tasks)."""
    with use_run(run):
        return LocalExecutor().select(cfg, candidates, train_uris, val_uris)


@dataclass
class RayExecutor:
    """Run the pipeline's steps on the Ray cluster of the run context
    (:func:`mspray.config.run.current_run`; default: ``$RAY_ADDRESS``, else a local Ray
    started on demand), showing progress as it says. ``trainer`` holds the Ray Train
    settings (run name, checkpoint storage, fault tolerance); ``pool`` the Ray Data actor
    pools'."""

    pool: PoolConfig = field(default_factory=PoolConfig)
    trainer: RayScaleTrainer = field(default_factory=RayScaleTrainer)
    name: str = "ray"

    def _init(self) -> None:
        init_ray()

    def train_scales(
        self, cfg: MSPrayConfig, train_uris: list[str], val_uris: list[str], state: dict | None
    ) -> dict[int, ScaleModel]:
        return self.trainer(cfg, train_uris, val_uris, state)

    def stage_one(
        self, cfg: MSPrayConfig, train_uris: list[str], state: dict | None
    ) -> tuple[dict, dict]:
        from mspray.ray.train_stage_one import ray_stage_one

        return ray_stage_one(
            cfg,
            train_uris,
            state,
            storage=self.trainer.storage,
        )

    def select(
        self,
        cfg: MSPrayConfig,
        candidates: Candidates,
        train_uris: list[str],
        val_uris: list[str],
    ) -> tuple[str, dict[str, dict]]:
        import ray

        from mspray.storage import normalize

        self._init()
        resources: dict = {"num_cpus": self.pool.cpus_per_worker}
        if gpus_per_actor(self.pool, cfg) > 0:
            resources["num_gpus"] = 1
        task = ray.remote(_select_on_worker).options(**resources)
        # absolute URIs: a worker's working directory is not the driver's
        uris = [[normalize(u) for u in us] for us in (train_uris, val_uris)]
        return ray.get(task.remote(current_run(), cfg, candidates, *uris))

    def model_uri(self, det: Detector, source: str | None, out: str | None) -> str | None:
        if source is not None:
            return source
        if not out:
            raise ValueError("on Ray the encoders are saved for the workers: give an output")
        from mspray.artifacts.bundle import save_bundle

        # an encoders-only version: never `latest`, which waits for the complete one
        uri = save_bundle(det, out)
        log.info("encoders saved for the Ray workers as %s", uri)
        return uri

    def embed(
        self, det: Detector, model: str | None, uris: list[str], keep: dict[int, float]
    ) -> Embeddings:
        self._init()
        rows, owners, errors = embed_images(model, det.cfg, uris, keep, self.pool)
        return Embeddings(rows, owners, errors)

    def coreset(
        self,
        det: Detector,
        rows: dict[int, np.ndarray],
        totals: dict[int, int],
        *,
        append: bool,
        append_all: bool,
    ) -> None:
        self._init()
        global_coreset(det, rows, totals, self.pool, append=append, append_all=append_all)

    def calibrate(
        self,
        det: Detector,
        model: str | None,
        names: list[str],
        in_bank: np.ndarray,
        embeddings: dict[int, tuple[np.ndarray, np.ndarray]],
        bank_config: FoldBankConfig,
        source: str,
    ) -> Calibration | None:
        self._init()

        def embed(uris, keep, scales):
            return embed_images(model, det.cfg, uris, keep, self.pool, scales)

        return calibrate_on_pool(
            det, model, names, in_bank, embeddings, self.pool, embed, bank_config, source
        )
