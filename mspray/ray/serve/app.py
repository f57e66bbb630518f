"""Ray Serve deployment: the fused MSPBA detector as an autoscaled HTTP endpoint.

Routes (FastAPI ingress):

- ``POST /v1/predict[?map=true]`` one image (raw body or multipart file field) ->
  ``{image_score, is_anomalous, threshold, model_version, batch_size}``; with
  ``map=true`` also ``scale_scores``, ``anomaly_map_png`` (base64 PNG heatmap) and
  ``map_range`` (the scores at the two ends of its colour ramp).
- ``GET /v1/model`` bundle config, version, scales, bank sizes, serving settings.
- ``GET /v1/stats`` this replica's executed batch sizes and rejections by status.
- ``GET /healthz``.

Concurrent requests are batched with ``@serve.batch``: one forward pass and one bank
search per batch. Settings are :class:`mspray.config.ServeConfig`: the builder's ``args``
give all of them; its :attr:`~mspray.config.ServeConfig.RELOADABLE` part (bundle URI,
device, batching, limits) is the deployment's ``user_config``. Changing that (``serve
deploy`` with an edited config) calls :meth:`reconfigure`, which loads the new bundle
*before* swapping one reference, so in-flight batches finish on the old model and no
request fails. Bad input gets a 4xx JSON ``{"error": ...}`` (see
:mod:`mspray.ray.serve.request`). Use :func:`build_app` as the import path.

No ``from __future__ import annotations`` here: FastAPI must see real types on the
routes of a Serve ingress class (string annotations turn ``Request`` into a query field).
"""

import asyncio
import base64
import collections
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from mspray.config import BATCH_WAIT_S, ConfigError, ServeConfig, validate
from mspray.ray.serve import request as inputs

# Serve's replica logger: lines land in the replica log with the request id.
log = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "MSPrayDetector"


@dataclass(frozen=True)
class ServingModel:
    """A loaded detector with the settings it serves under; swapped as one reference."""

    detector: Any  # mspray.detector.Detector
    settings: ServeConfig
    max_image_bytes: int
    max_image_pixels: int
    loaded_at: float


@dataclass
class ItemResult:
    image_score: float
    is_anomalous: bool | None
    threshold: float | None
    model_version: str
    batch_size: int
    scale_scores: dict[str, float]
    amap: np.ndarray  # H×W fused anomaly map


def load_detector(settings: ServeConfig) -> Any:
    """Load the bundle of ``settings`` on its device and run one warm-up batch (lazy init
    off the request path)."""
    from mspray.bundle import load_bundle, read_config, resolve_bundle
    from mspray.device import resolve_device

    if not settings.bundle_uri:
        raise ConfigError("bundle_uri: not set (args.bundle or user_config.bundle_uri)")
    # a root resolves to its latest version now; both reads below use that same version
    uri = resolve_bundle(settings.bundle_uri)
    # The bundle's own runtime settings, with the faiss search moved to the GPU if asked.
    config = read_config(uri).replace(**{"bank.use_gpu": True}) if settings.bank_gpu else None
    device = resolve_device(serve_device(settings.device, ray.get_gpu_ids()))
    det = load_bundle(uri, device=device, config=config)
    size = det.cfg.model.image_size
    det.predict(torch.zeros(1, 3, size, size))
    return det


def serve_device(setting: str, gpu_ids: list) -> str:
    """The torch device of a replica: ``auto`` means CUDA only when this replica reserved
    a GPU (``num_gpus``); one without a reservation stays on the CPU even on a GPU node,
    where another actor owns the GPU."""
    if setting == "auto":
        return "cuda" if gpu_ids else "cpu"
    return setting


def decode_resized(data: bytes, name: str, current: ServingModel, size: int) -> torch.Tensor:
    """Decode (checking the pixel limit) and resize to the model's input: 3×size×size."""
    from mspray.data.images import to_tensor

    return to_tensor(inputs.decode(data, name, current.max_image_pixels), size)


def score_batch(det: Any, images: list[torch.Tensor]) -> list[ItemResult]:
    """One forward pass and one bank search per scale for the whole batch."""
    size = det.cfg.model.image_size
    # An image resized for the previous model can meet a new model of another size
    # right after a swap: bring it to this model's size.
    batch = torch.stack(
        [
            t
            if t.shape[-1] == size and t.shape[-2] == size
            else F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True)[0]
            for t in images
        ]
    )
    pred = det.predict(batch)
    out = []
    for i in range(len(images)):
        flag = None if pred.is_anomalous is None else bool(pred.is_anomalous[i])
        out.append(
            ItemResult(
                image_score=float(pred.image_scores[i]),
                is_anomalous=flag,
                threshold=det.threshold,
                model_version=det.version,
                batch_size=len(images),
                scale_scores={str(s): float(v[i]) for s, v in pred.scale_scores.items()},
                amap=pred.maps[i].numpy(),
            )
        )
    return out


def map_png_base64(amap: np.ndarray, threshold: float | None) -> tuple[str, list[float]]:
    """The anomaly map as a base64 PNG heatmap (threshold mid-ramp) and its colour range."""
    from mspray.viz import color_range, colorize, to_png

    lo, hi = color_range(amap, threshold)
    return base64.b64encode(to_png(colorize(amap, lo, hi))).decode("ascii"), [lo, hi]


def apply_user_config(args: ServeConfig, user_config: dict[str, Any] | None) -> ServeConfig:
    """The builder's ``args`` with a deployment's ``user_config`` applied on top.

    ``user_config`` may only hold :attr:`ServeConfig.RELOADABLE` fields: the others set
    replicas and resources, which a replica cannot change from inside.
    """
    user = dict(user_config or {})
    unknown = sorted(set(user) - set(ServeConfig.RELOADABLE))
    if unknown:
        raise ConfigError(
            f"user_config.{unknown[0]}: not a reloadable setting "
            f"(user_config takes {', '.join(ServeConfig.RELOADABLE)})"
        )
    return validate(ServeConfig, {**args.model_dump(), **user})


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


api = FastAPI(
    title="mspray",
    description="MSPBA anomaly detection: POST an image to /v1/predict for its anomaly "
    "score (and, with ?map=true, its anomaly map).",
)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Bad query parameters: the same ``{"error": ...}`` shape as every other 4xx."""
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
    )
    log.warning("rejected %s %s: 422 %s", request.method, request.url.path, detail)
    return error(422, f"invalid request: {detail}")


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64)
@serve.ingress(api)
class MSPrayDetector:
    """One replica: a loaded detector, a batch queue and counters."""

    def __init__(self, args: dict[str, Any] | None = None):
        # Nothing is loaded here: Serve calls reconfigure(user_config) right after
        # __init__, and that is the one place a model is (re)loaded.
        self._args = validate(ServeConfig, args or {}, where="args")
        self._current: ServingModel | None = None
        self._reload_lock = asyncio.Lock()
        self._reload_error: str | None = None
        self._requested_bundle: str | None = None
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._rejections: collections.Counter[int] = collections.Counter()
        self._n_predictions = 0

    # ------------------------------------------------------------------ lifecycle
    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply a new ``user_config``: load a changed bundle first, then swap.

        At start-up a bad config fails the replica (Serve reports it). Later, a bundle
        that cannot be loaded keeps the current model serving; the error is logged and
        shown in GET /v1/model, since failing here would take every replica down.
        """
        async with self._reload_lock:
            self._requested_bundle = (user_config or {}).get("bundle_uri", self._args.bundle_uri)
            try:
                settings = apply_user_config(self._args, user_config)
                current = self._current
                if current is not None and current.settings.model_key() == settings.model_key():
                    det = current.detector
                else:
                    log.info("loading bundle %s", settings.bundle_uri)
                    det = await asyncio.to_thread(load_detector, settings)
                self._predict_batch.set_max_batch_size(settings.max_batch_size)
                self._predict_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
                score_cfg = det.cfg.score
                self._current = ServingModel(  # the swap: one reference assignment
                    detector=det,
                    settings=settings,
                    max_image_bytes=settings.max_image_bytes or score_cfg.max_image_bytes,
                    max_image_pixels=settings.max_image_pixels or score_cfg.max_image_pixels,
                    loaded_at=time.time(),
                )
                self._reload_error = None
                log.info("serving model %s from %s", det.version, settings.bundle_uri)
            except Exception as e:
                if self._current is None:
                    raise
                self._reload_error = f"{type(e).__name__}: {e}"
                log.exception(
                    "reconfigure failed; still serving %s", self._current.settings.bundle_uri
                )

    def check_health(self) -> None:
        """Serve's health check: a replica without a model is not healthy."""
        if self._current is None:
            raise RuntimeError("no model loaded: set user_config.bundle_uri")

    # ------------------------------------------------------------------ batching
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _predict_batch(self, images: list[torch.Tensor]) -> list[ItemResult]:
        current = self._current  # pinned: a swap during this batch does not affect it
        assert current is not None
        # Off the event loop, so requests keep arriving (and queueing) while it runs.
        results = await asyncio.to_thread(score_batch, current.detector, images)
        self._batch_sizes[len(images)] += 1
        return results

    # ------------------------------------------------------------------ routes
    def _reject(self, request: Request, bad: inputs.BadInput) -> JSONResponse:
        self._rejections[bad.status] += 1
        client = request.client.host if request.client else "?"
        log.warning("rejected request from %s: %d %s", client, bad.status, bad.message)
        return error(bad.status, bad.message)

    @api.post("/v1/predict")
    async def predict(
        self, request: Request, with_map: bool = Query(False, alias="map")
    ) -> JSONResponse:
        """Score one image: raw body (image/*, application/octet-stream) or a multipart
        file field. ``map=true`` adds the anomaly map and per-scale scores."""
        current = self._current
        if current is None:
            return error(503, "no model loaded yet")
        try:
            body, name = await inputs.read_image(request, current.max_image_bytes)
            size = current.detector.cfg.model.image_size
            image = await asyncio.to_thread(decode_resized, body, name, current, size)
        except inputs.BadInput as bad:
            return self._reject(request, bad)
        try:
            r: ItemResult = await self._predict_batch(image)
        except Exception:
            log.exception("prediction failed")
            return error(500, "internal error while scoring the image")
        self._n_predictions += 1
        out: dict[str, Any] = {
            "image_score": r.image_score,
            "is_anomalous": r.is_anomalous,
            "threshold": r.threshold,
            "model_version": r.model_version,
            "batch_size": r.batch_size,
        }
        if with_map:
            png, rng = await asyncio.to_thread(map_png_base64, r.amap, r.threshold)
            out.update(scale_scores=r.scale_scores, anomaly_map_png=png, map_range=rng)
        return JSONResponse(out)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """``ok``, or ``degraded`` when the last requested swap failed: then the old model
        still serves, and the answer names it, the requested bundle and the error (what
        ``ray_jobs/deploy.py`` checks on every replica after a rollout)."""
        current = self._current
        replica = serve.get_replica_context().replica_id.unique_id
        if current is None:
            return JSONResponse({"status": "loading", "replica": replica}, status_code=503)
        return JSONResponse(
            {
                "status": "degraded" if self._reload_error else "ok",
                "replica": replica,
                "model_version": current.detector.version,
                "bundle_uri": current.settings.bundle_uri,
                "requested_bundle_uri": self._requested_bundle,
                "last_reload_error": self._reload_error,
            }
        )

    @api.get("/v1/model")
    async def model_info(self) -> JSONResponse:
        current = self._current
        if current is None:
            return error(503, "no model loaded yet")
        det = current.detector
        return JSONResponse(
            {
                "model_version": det.version,
                "bundle_uri": current.settings.bundle_uri,
                "scales": list(det.scales),
                "strides": list(det.cfg.model.strides),
                "image_size": det.cfg.model.image_size,
                "bank_sizes": {str(s): b.ntotal for s, b in det.banks.items()},
                "threshold": det.threshold,
                "device": str(det.device),
                "torch_threads": torch.get_num_threads(),
                "config": det.cfg.to_dict(),
                "serving": current.settings.model_dump(),
                "limits": {
                    "max_image_bytes": current.max_image_bytes,
                    "max_image_pixels": current.max_image_pixels,
                },
                "loaded_at": current.loaded_at,
                "last_reload_error": self._reload_error,
            }
        )

    @api.get("/v1/stats")
    async def stats(self) -> JSONResponse:
        """Counters of this replica (each replica keeps its own)."""
        ctx = serve.get_replica_context()
        return JSONResponse(
            {
                "replica": ctx.replica_tag,
                "predictions": self._n_predictions,
                "batches": sum(self._batch_sizes.values()),
                "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
                "rejections": {str(k): v for k, v in sorted(self._rejections.items())},
            }
        )


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """The Serve options of the detector deployment for ``cfg``: a fixed replica count, or
    autoscaling between ``replicas`` and ``max_replicas``; resources and the reloadable
    settings as the default ``user_config``."""
    if cfg.max_replicas is not None and cfg.max_replicas < cfg.replicas:
        raise ConfigError(f"max_replicas={cfg.max_replicas}: below replicas={cfg.replicas}")
    replicas: dict[str, Any]
    if cfg.max_replicas is None:
        replicas = {"num_replicas": cfg.replicas}
    else:
        replicas = {
            "autoscaling_config": {
                "min_replicas": cfg.replicas,
                "max_replicas": cfg.max_replicas,
                "target_ongoing_requests": cfg.target_ongoing_requests,
            }
        }
    return {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "user_config": cfg.user_config(),
        **replicas,
    }


def build_app(args: dict[str, Any] | ServeConfig | None = None) -> Application:
    """Serve application builder: ``import_path: mspray.ray.serve:build_app``.

    ``args`` are :class:`~mspray.config.ServeConfig` fields (``args:`` of serve_config.yaml);
    the bundle may also come only from the config's ``user_config.bundle_uri``. A config
    file's ``deployments:`` section overrides the options derived here.
    """
    cfg = args if isinstance(args, ServeConfig) else validate(ServeConfig, args or {}, "args")
    options = deployment_options(cfg)  # validates before anything is bound
    return MSPrayDetector.options(**options).bind(cfg.model_dump())
