"""Ray Serve deployment: the fused MSPBA detector as an autoscaled HTTP endpoint.

Routes (FastAPI ingress):

- ``POST /v1/predict[?map=true][&model=NAME]`` one image (raw body or multipart file
  field) -> ``{model, image_score, is_anomalous, threshold, model_version, batch_size}``;
  with ``map=true`` also ``scale_scores``, ``anomaly_map_png`` (base64 PNG heatmap) and
  ``map_range`` (the scores at the two ends of its colour ramp).
- ``GET /v1/models`` served names, bundle URIs and versions, which are loaded here.
- ``GET /v1/model[?model=NAME]`` bundle config, version, scales, bank sizes, settings.
- ``GET /v1/stats`` this replica's executed batch sizes and rejections by status.
- ``GET /healthz``.

Several bundles (issue 12): ``ServeConfig.models`` names them (``bundle_uri`` is the one
named ``default``). A request picks one with ``?model=NAME`` or the
``serve_multiplexed_model_id`` header; each replica loads models lazily into an LRU of
``max_num_models_per_replica`` through ``@serve.multiplexed``. Serve's proxy routes on the
header only (``proxy.py`` reads no query parameter), so the header gets the replica that
already holds the model; a ``?model=`` request is served by the replica it reaches, which
loads the model if needed (no extra hop). Batches are grouped by model, so requests for
one model share a forward pass. Unknown name -> 404 with the known names; a bundle that
cannot be loaded -> 503 with the reason, and the other models keep serving.

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
from mspray.ray.metrics import ServeMetrics
from mspray.ray.serve import request as inputs

# Serve's replica logger: lines land in the replica log with the request id.
log = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "MSPrayDetector"


@dataclass(frozen=True)
class ServingModel:
    """A loaded detector with the settings it serves under; swapped as one reference."""

    name: str
    uri: str
    detector: Any  # mspray.detector.Detector
    settings: ServeConfig
    max_image_bytes: int
    max_image_pixels: int
    loaded_at: float

    @property
    def key(self) -> tuple:
        return self.settings.model_key(self.uri)


class ModelSlot:
    """One named model in a replica's LRU (what the ``@serve.multiplexed`` loader returns).

    ``current`` is replaced in place when ``user_config`` points the name at another bundle
    (load first, then swap), so the LRU entry survives a hot swap. Serve calls ``__del__``
    when it unloads the slot; it runs once (garbage collection calls it again).
    """

    def __init__(self, current: ServingModel, on_unload: Any):
        self.current = current
        self._on_unload = on_unload
        self._unloaded = False

    def __del__(self) -> None:
        if not self._unloaded:
            self._unloaded = True
            self._on_unload(self)


@dataclass
class ItemResult:
    image_score: float
    is_anomalous: bool | None
    threshold: float | None
    model_version: str
    batch_size: int
    scale_scores: dict[str, float]
    amap: np.ndarray  # H×W fused anomaly map


class ModelLoadError(RuntimeError):
    """A named model's bundle could not be loaded (HTTP 503 with this reason)."""


#: Seconds a failed model load is answered from memory before the next attempt.
LOAD_RETRY_S = 30.0


class NoModel(Exception):
    """A request names no served model: ``status`` 400 (ambiguous) or 404 (unknown)."""

    def __init__(self, status: int, message: str, models: list[str]):
        super().__init__(message)
        self.status, self.message, self.models = status, message, models


def load_detector(uri: str, settings: ServeConfig) -> Any:
    """Load the bundle at ``uri`` on the device of ``settings`` and run one warm-up batch
    (lazy init off the request path)."""
    from mspray.bundle import load_bundle, read_config, resolve_bundle
    from mspray.device import resolve_device

    uri = resolve_bundle(uri)  # a root: its latest version now; both reads use that one
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


def serving_model(
    name: str, uri: str, settings: ServeConfig, det: Any | None = None
) -> ServingModel:
    """``det`` (loaded from ``uri`` when not given) with the limits ``settings`` give it."""
    det = det if det is not None else load_detector(uri, settings)
    score_cfg = det.cfg.score
    return ServingModel(
        name=name,
        uri=uri,
        detector=det,
        settings=settings,
        max_image_bytes=settings.max_image_bytes or score_cfg.max_image_bytes,
        max_image_pixels=settings.max_image_pixels or score_cfg.max_image_pixels,
        loaded_at=time.time(),
    )


def pick_model(models: dict[str, str], query: str | None, header: str | None) -> str:
    """The model a request names (``?model=`` or the multiplexed-model-id header); without
    one, the only model, else ``"default"`` (the bare bundle). Raises :class:`NoModel`."""
    names = sorted(models)
    if query and header and query != header:
        raise NoModel(400, f"?model={query!r} and the model id header {header!r} disagree", names)
    name = query or header
    if not name:
        if len(models) == 1:
            return names[0]
        if ServeConfig.DEFAULT_MODEL in models:
            return ServeConfig.DEFAULT_MODEL
        raise NoModel(
            400,
            f"{len(names)} models are served: name one with ?model=NAME or the "
            f"serve_multiplexed_model_id header ({', '.join(names)})",
            names,
        )
    if name not in models:
        raise NoModel(
            404, f"unknown model {name!r}; known models: {', '.join(names) or 'none'}", names
        )
    return name


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
    """One replica: named models in an LRU (Serve model multiplexing), a batch queue and
    counters."""

    def __init__(self, args: dict[str, Any] | None = None):
        # Nothing is loaded here: Serve calls reconfigure(user_config) right after
        # __init__, and that is the one place settings (and a single model) are loaded.
        self._args = validate(ServeConfig, args or {}, where="args")
        self._settings: ServeConfig | None = None
        self._slots: dict[str, ModelSlot] = {}  # what the LRU holds on this replica
        self._load_errors: dict[tuple, tuple[str, float]] = {}  # model key -> (reason, when)
        self._reload_lock = asyncio.Lock()
        self._reload_error: str | None = None
        self._requested: dict[str, str] | None = None  # the models of the last user_config
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._rejections: collections.Counter[int] = collections.Counter()
        self._n_predictions = 0
        self._metrics = ServeMetrics()

        # The LRU size is a builder argument (the decorator takes it once); a closure, so
        # each replica object gets its own loader.
        async def load_named_model(name: str) -> ModelSlot:
            return await self._load_slot(name)

        self._get_model = serve.multiplexed(
            max_num_models_per_replica=self._args.max_num_models_per_replica
        )(load_named_model)

    # ------------------------------------------------------------------ lifecycle
    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply a new ``user_config``: load every changed bundle of a loaded name first,
        then swap them.

        At start-up a bad config (or, with a single model, a bundle that cannot be loaded)
        fails the replica (Serve reports it). Later, a bundle that cannot be loaded keeps
        the current model serving; the error is logged and shown in GET /v1/model, since
        failing here would take every replica down.
        """
        async with self._reload_lock:
            first = self._settings is None
            self._requested = None
            try:
                settings = apply_user_config(self._args, user_config)
                self._requested = settings.named_models()
                models = settings.named_models()
                if not models:
                    raise ConfigError("no model: set user_config.bundle_uri or user_config.models")
                swaps: dict[str, ServingModel] = {}
                for name, slot in list(self._slots.items()):
                    uri, old = models.get(name), slot.current
                    if uri is None:
                        continue  # no longer served: 404 from now on; the LRU drops it
                    det = old.detector if old.key == settings.model_key(uri) else None
                    if det is None:
                        log.info("loading bundle %s for model %s", uri, name)
                    swaps[name] = await asyncio.to_thread(serving_model, name, uri, settings, det)
                self._predict_batch.set_max_batch_size(settings.max_batch_size)
                self._predict_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
                for name, new in swaps.items():  # the swaps: one reference assignment each
                    if new.detector is not self._slots[name].current.detector:
                        self._metrics.loaded(name, self._slots[name].current.detector.version, 0)
                        self._metrics.loaded(name, new.detector.version)
                    self._slots[name].current = new
                self._settings = settings
                self._load_errors.clear()
                self._reload_error = None
                if first and len(models) == 1:
                    # one model: load it now, so a bad bundle fails the deployment at start
                    await self._get_model(next(iter(models)))
                log.info("serving models %s", models)
            except Exception as e:
                if first:
                    self._settings = None
                    raise
                self._reload_error = f"{type(e).__name__}: {e}"
                log.exception("reconfigure failed; still serving the previous settings")

    def check_health(self) -> None:
        """Serve's health check: a replica without valid settings is not healthy."""
        if self._settings is None:
            raise RuntimeError("not configured: set user_config.bundle_uri or models")

    # ------------------------------------------------------------------ models
    async def _load_slot(self, name: str) -> ModelSlot:
        """The ``@serve.multiplexed`` loader: load ``name``'s bundle (off the event loop).

        A failed load is remembered for :data:`LOAD_RETRY_S`, so a broken bundle answers
        503 quickly instead of being reloaded by every request (Serve loads one model at a
        time per replica)."""
        settings = self._settings
        assert settings is not None
        uri = settings.named_models()[name]
        key = settings.model_key(uri)
        failed = self._load_errors.get(key)
        if failed is not None and time.monotonic() - failed[1] < LOAD_RETRY_S:
            raise ModelLoadError(failed[0])
        log.info("loading model %s from %s", name, uri)
        try:
            current = await asyncio.to_thread(serving_model, name, uri, settings)
        except Exception as e:
            reason = f"model {name!r} ({uri}) could not be loaded: {type(e).__name__}: {e}"
            self._load_errors[key] = (reason, time.monotonic())
            raise ModelLoadError(reason) from e
        slot = ModelSlot(current, self._unloaded)
        self._slots[name] = slot
        self._metrics.loaded(name, current.detector.version)
        return slot

    def _unloaded(self, slot: ModelSlot) -> None:
        """Serve's LRU dropped ``slot`` (called from ``ModelSlot.__del__``)."""
        name = slot.current.name
        if self._slots.get(name) is slot:
            del self._slots[name]
        self._metrics.loaded(name, slot.current.detector.version, 0)
        log.info("unloaded model %s", name)

    async def _serving(self, query: str | None) -> ServingModel:
        """The loaded model a request names (raises :class:`NoModel`, :class:`ModelLoadError`)."""
        settings = self._settings
        if settings is None:
            raise ModelLoadError("not configured yet")
        name = pick_model(settings.named_models(), query, serve.get_multiplexed_model_id())
        slot = await self._get_model(name)
        return slot.current

    # ------------------------------------------------------------------ batching
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _predict_batch(
        self, items: list[tuple[ServingModel, torch.Tensor]]
    ) -> list[ItemResult]:
        """One forward pass per model among the batched requests (Serve already splits
        batches by the model-id header; requests naming the model with ``?model=`` are
        grouped here). Each item is pinned to the model it resolved to, so a swap during
        the batch does not affect it."""
        groups: dict[int, list[int]] = collections.defaultdict(list)
        for i, (serving, _) in enumerate(items):
            groups[id(serving)].append(i)
        out: list[ItemResult | None] = [None] * len(items)
        for idx in groups.values():
            serving = items[idx[0]][0]
            # Off the event loop, so requests keep arriving (and queueing) while it runs.
            results = await asyncio.to_thread(
                score_batch, serving.detector, [items[i][1] for i in idx]
            )
            self._batch_sizes[len(idx)] += 1
            self._metrics.batch(serving.name, [r.is_anomalous for r in results])
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ routes
    def _reject(self, request: Request, bad: inputs.BadInput) -> JSONResponse:
        self._rejections[bad.status] += 1
        client = request.client.host if request.client else "?"
        log.warning("rejected request from %s: %d %s", client, bad.status, bad.message)
        return error(bad.status, bad.message)

    @api.post("/v1/predict")
    async def predict(
        self,
        request: Request,
        with_map: bool = Query(False, alias="map"),
        model: str | None = Query(None, description="model name (see GET /v1/models)"),
    ) -> JSONResponse:
        """Score one image: raw body (image/*, application/octet-stream) or a multipart
        file field, with the model named by ``?model=`` or the model-id header.
        ``map=true`` adds the anomaly map and per-scale scores."""
        t0 = time.perf_counter()
        tag = "unknown"  # a name that is not configured never becomes a metric tag

        def done(outcome: str, response: JSONResponse) -> JSONResponse:
            self._metrics.request(tag, outcome, time.perf_counter() - t0)
            return response

        try:
            current = await self._serving(model)
        except NoModel as e:
            self._rejections[e.status] += 1
            body = {"error": e.message, "models": e.models}
            return done("unknown_model", JSONResponse(body, status_code=e.status))
        except ModelLoadError as e:
            self._rejections[503] += 1
            return done("load_failed", error(503, str(e)))
        tag = current.name
        try:
            body, name = await inputs.read_image(request, current.max_image_bytes)
            size = current.detector.cfg.model.image_size
            image = await asyncio.to_thread(decode_resized, body, name, current, size)
        except inputs.BadInput as bad:
            return done("bad_input", self._reject(request, bad))
        try:
            r: ItemResult = await self._predict_batch((current, image))
        except Exception:
            log.exception("prediction failed")
            return done("error", error(500, "internal error while scoring the image"))
        self._n_predictions += 1
        out: dict[str, Any] = {
            "model": current.name,
            "image_score": r.image_score,
            "is_anomalous": r.is_anomalous,
            "threshold": r.threshold,
            "model_version": r.model_version,
            "batch_size": r.batch_size,
        }
        if with_map:
            png, rng = await asyncio.to_thread(map_png_base64, r.amap, r.threshold)
            out.update(scale_scores=r.scale_scores, anomaly_map_png=png, map_range=rng)
        return done("ok", JSONResponse(out))

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """``ok``, or ``degraded`` when the last requested change failed: then the previous
        models still serve, and the answer says which bundles are served, which were
        requested, and the error (what ``ray_jobs/deploy.py`` checks on every replica
        after a rollout)."""
        replica = serve.get_replica_context().replica_id.unique_id
        if self._settings is None:
            return JSONResponse({"status": "loading", "replica": replica}, status_code=503)
        loaded = {n: s.current.detector.version for n, s in sorted(self._slots.items())}
        out: dict[str, Any] = {
            "status": "degraded" if self._reload_error else "ok",
            "replica": replica,
            "loaded": loaded,
            "models": self._settings.named_models(),
            "requested": self._requested,
            "last_reload_error": self._reload_error,
        }
        if len(self._settings.named_models()) == 1 and len(loaded) == 1:
            out["model_version"] = next(iter(loaded.values()))  # the single-bundle form
        return JSONResponse(out)

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        """Every served name with its bundle URI and version, and whether it is loaded on
        the replica answering (each replica holds its own LRU)."""
        from mspray.bundle import read_meta

        settings = self._settings
        if settings is None:
            return error(503, "not configured yet")

        def describe(name: str, uri: str) -> dict[str, Any]:
            entry: dict[str, Any] = {"name": name, "uri": uri, "version": None}
            try:
                entry["version"] = read_meta(uri).get("version")
            except Exception as e:  # listed anyway: a broken bundle is what one looks for
                entry["error"] = f"{type(e).__name__}: {e}"
            slot = self._slots.get(name)
            entry["loaded"] = slot is not None
            entry["loaded_version"] = slot.current.detector.version if slot else None
            return entry

        named = settings.named_models()
        listed = await asyncio.gather(
            *(asyncio.to_thread(describe, n, u) for n, u in sorted(named.items()))
        )
        return JSONResponse(
            {
                "models": listed,
                "replica": serve.get_replica_context().replica_tag,
                "max_num_models_per_replica": self._args.max_num_models_per_replica,
            }
        )

    @api.get("/v1/model")
    async def model_info(self, model: str | None = Query(None)) -> JSONResponse:
        """Details of one model (``?model=NAME``, or the only / default one)."""
        try:
            current = await self._serving(model)
        except NoModel as e:
            return JSONResponse({"error": e.message, "models": e.models}, status_code=e.status)
        except ModelLoadError as e:
            return error(503, str(e))
        det = current.detector
        return JSONResponse(
            {
                "model": current.name,
                "model_version": det.version,
                "bundle_uri": current.uri,
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
                "loaded_models": sorted(self._slots),
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
