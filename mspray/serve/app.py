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
search per batch. The bundle URI and the batching settings live in ``user_config``;
changing them (``serve deploy`` with an edited config) calls :meth:`reconfigure`, which
loads the new bundle *before* swapping one reference, so in-flight batches finish on the
old model and no request fails. Bad input gets a 4xx JSON ``{"error": ...}`` (see
:mod:`mspray.serve.inputs`). Use :func:`build_app` as the import path.

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
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from mspray.serve import inputs

# Serve's replica logger: lines land in the replica log with the request id.
log = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "MSPrayDetector"
#: Default batch wait. Longer than Serve's 10 ms: under load a client's next request takes
#: tens of ms to travel client -> proxy -> replica, and a shorter wait splits the clients
#: into small cohorts that never share a batch (measured in benchmarks/bench_serve.py).
BATCH_WAIT_S = 0.02


class ServeSettings(BaseModel):
    """The deployment's ``user_config``: everything that can change without a restart."""

    model_config = ConfigDict(extra="forbid")

    bundle_uri: str = Field(description="model bundle, local path or s3://")
    device: str = Field("auto", description="torch device: auto, cpu, cuda[:N]")
    bank_gpu: bool = Field(False, description="faiss bank search on the GPU")
    max_batch_size: int = Field(16, ge=1, description="requests per forward pass")
    batch_wait_timeout_s: float = Field(
        BATCH_WAIT_S, ge=0, description="how long a batch waits to fill up"
    )
    max_image_bytes: int | None = Field(
        None, gt=0, description="body size limit (default: the bundle's score.max_image_bytes)"
    )
    max_image_pixels: int | None = Field(
        None, gt=0, description="pixel limit (default: the bundle's score.max_image_pixels)"
    )

    def model_key(self) -> tuple:
        """Settings whose change needs a new model load (the rest apply instantly)."""
        return (self.bundle_uri, self.device, self.bank_gpu)


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (``args:`` in serve_config.yaml, ``key=value`` on
    ``serve run``). Serving settings become the default ``user_config``; the others set
    the deployment's replicas and resources. A config file's ``deployments:`` section
    overrides all of them."""

    model_config = ConfigDict(extra="forbid")

    bundle: str | None = None
    device: str = "auto"
    bank_gpu: bool = False
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(BATCH_WAIT_S, ge=0)
    max_image_bytes: int | None = Field(None, gt=0)
    max_image_pixels: int | None = Field(None, gt=0)
    #: A fixed replica count; None autoscales between min_replicas and max_replicas.
    num_replicas: int | None = Field(None, ge=1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    #: Must stay above max_batch_size, or batches can never fill up.
    max_ongoing_requests: int = Field(64, ge=1)
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)

    def user_config(self) -> dict[str, Any]:
        cfg = {
            "bundle_uri": self.bundle,
            "device": self.device,
            "bank_gpu": self.bank_gpu,
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "max_image_bytes": self.max_image_bytes,
            "max_image_pixels": self.max_image_pixels,
        }
        return {k: v for k, v in cfg.items() if v is not None}


@dataclass(frozen=True)
class Loaded:
    """A loaded detector with the settings it serves under; swapped as one reference."""

    detector: Any  # mspray.detector.Detector
    settings: ServeSettings
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


def load_detector(settings: ServeSettings) -> Any:
    """Load the bundle of ``settings`` and run one warm-up batch (lazy init off the
    request path)."""
    from mspray import storage
    from mspray.bundle import load_bundle
    from mspray.config import MSPrayConfig
    from mspray.train.loop import resolve_device

    override = None
    if settings.bank_gpu:
        text = storage.read_text(storage.join(settings.bundle_uri, "config.json"))
        override = MSPrayConfig.from_json(text).replace(**{"bank.use_gpu": True})
    det = load_bundle(settings.bundle_uri, device=resolve_device(settings.device), config=override)
    size = det.cfg.model.image_size
    det.predict(torch.zeros(1, 3, size, size))
    return det


def decode_resized(data: bytes, name: str, current: Loaded, size: int) -> torch.Tensor:
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

    def __init__(self, defaults: dict[str, Any] | None = None):
        # Nothing is loaded here: Serve calls reconfigure(user_config) right after
        # __init__, and that is the one place a model is (re)loaded.
        self._defaults = dict(defaults or {})
        self._current: Loaded | None = None
        self._reload_lock = asyncio.Lock()
        self._reload_error: str | None = None
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
            try:
                settings = ServeSettings.model_validate({**self._defaults, **(user_config or {})})
                current = self._current
                if current is not None and current.settings.model_key() == settings.model_key():
                    det = current.detector
                else:
                    log.info("loading bundle %s", settings.bundle_uri)
                    det = await asyncio.to_thread(load_detector, settings)
                self._predict_batch.set_max_batch_size(settings.max_batch_size)
                self._predict_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
                score_cfg = det.cfg.score
                self._current = Loaded(  # the swap: one reference assignment
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
                log.exception("reconfigure failed; still serving %s", self._current.settings)

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
            ctype = request.headers.get("content-type")
            kind = inputs.body_kind(ctype)
            inputs.check_declared_length(
                request.headers.get("content-length"), current.max_image_bytes
            )
            body = await inputs.read_limited(request.stream(), current.max_image_bytes)
            name = "request body"
            if kind == "multipart":
                body, name = inputs.multipart_file(body, ctype or "")
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
        current = self._current
        if current is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model_version": current.detector.version})

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
                # promised false-alarm rate (+ production check after `mspray calibrate`)
                "calibration": det.meta.get("calibration"),
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


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    """Serve application builder: ``import_path: mspray.serve:build_app``.

    ``args`` are :class:`AppArgs`; the bundle may also come only from the config's
    ``user_config.bundle_uri``.
    """
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    if a.max_ongoing_requests < a.max_batch_size:
        raise ValueError(
            f"max_ongoing_requests={a.max_ongoing_requests} is below max_batch_size="
            f"{a.max_batch_size}: batches could never fill up"
        )
    replicas: dict[str, Any]
    if a.num_replicas is not None:
        replicas = {"num_replicas": a.num_replicas}
    else:
        replicas = {
            "autoscaling_config": {
                "min_replicas": a.min_replicas,
                "max_replicas": max(a.max_replicas, a.min_replicas),
                "target_ongoing_requests": a.target_ongoing_requests,
            }
        }
    defaults = a.user_config()
    return MSPrayDetector.options(
        max_ongoing_requests=a.max_ongoing_requests,
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
        user_config=defaults,
        **replicas,
    ).bind(defaults)
