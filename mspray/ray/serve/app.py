"""Ray Serve deployment: the fused MSPBA detector as an autoscaled HTTP endpoint.

Routes (FastAPI ingress):

- ``POST /v1/predict[?map=true][&model=NAME]`` one image (raw body or multipart file
  field) -> ``{model, image_score, is_anomalous, threshold, model_version, batch_size}``;
  with ``map=true`` also ``scale_scores``, ``anomaly_map_png`` (base64 PNG heatmap) and
  ``map_range`` (the scores at the two ends of its colour ramp).
- ``GET /v1/models`` served names, bundle URIs and versions, which are loaded here.
- ``GET /v1/model[?model=NAME]`` bundle config, version, scales, bank sizes, settings.
- ``GET /v1/stats`` this replica's executed batch sizes and rejections by status.
- ``GET /healthz``; ``GET /v1/replicas`` every replica's last ``/healthz`` answer.

Several bundles: ``ServeConfig.models`` names them (``bundle_uri`` is the one
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
request fails (the models, their loading and the swap: :mod:`mspray.ray.serve.slots`). Bad
input gets a 4xx JSON ``{"error": ...}`` (see :mod:`mspray.ray.serve.request`). Use
:func:`build_app` as the import path.

No ``from __future__ import annotations`` here: FastAPI must see real types on the
routes of a Serve ingress class (string annotations turn ``Request`` into a query field).
"""

import asyncio
import collections
import logging
import time
import uuid
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from mspray.config import BATCH_WAIT_S, ConfigError, ServeConfig, validate
from mspray.ray.metrics import ServeMetrics
from mspray.ray.serve import request as inputs
from mspray.ray.serve.loading import ServingModel
from mspray.ray.serve.pins import ServePins
from mspray.ray.serve.predict import ItemResult, decode_resized, map_png_base64, score_batch
from mspray.ray.serve.slots import (
    ModelLoadError,
    ModelSlot,
    ModelSlots,
    NoModel,
)

# Serve's replica logger: lines land in the replica log with the request id.
log = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "MSPrayDetector"


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

    def __init__(self, args: dict[str, Any] | None = None, build_id: str | None = None):
        # Nothing is loaded here: Serve calls reconfigure(user_config) right after
        # __init__, and that is the one place settings (and a single model) are loaded.
        self._args = validate(ServeConfig, args or {}, where="args")
        self._metrics = ServeMetrics()
        app = serve.get_replica_context().app_name
        self._pins = ServePins(app, build_id)
        self._models = ModelSlots(self._args, self._metrics, pins=self._pins)
        self._refresh: asyncio.Task | None = None
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._rejections: collections.Counter[int] = collections.Counter()
        self._n_predictions = 0

        # The LRU size is a builder argument (the decorator takes it once); a closure, so
        # each replica object gets its own loader.
        async def load_named_model(name: str) -> ModelSlot:
            return await self._models.load(name)

        self._get_model = serve.multiplexed(
            max_num_models_per_replica=self._args.max_num_models_per_replica
        )(load_named_model)

    # ------------------------------------------------------------------ lifecycle
    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply a new ``user_config``: changed bundles are loaded before they are swapped
        in (see :meth:`ModelSlots.reconfigure`)."""
        await self._models.reconfigure(user_config, self._get_model, self._apply)
        await self._report()

    async def _report(self) -> None:
        """This replica's :meth:`_health` where every replica's is (see ``/v1/replicas``)."""
        health = self._health()
        await self._pins.report(health["replica"], health)

    def _apply(self, settings: ServeConfig) -> None:
        self._predict_batch.set_max_batch_size(settings.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def check_health(self) -> None:
        """Serve's health check: the replica has valid settings and every loaded model
        answers a small prediction, so Serve replaces a replica whose device failed for
        good (e.g. a dead CUDA context). It also starts, in the background, a retry of a
        failed change of models or the re-resolution of bundle roots after a new deploy."""
        if self._models.settings is None:
            raise RuntimeError("not configured: set user_config.bundle_uri or models")
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._refreshed())
        await self._models.check_health()
        await self._report()

    async def _refreshed(self) -> None:
        try:
            await self._models.refresh(self._get_model, self._apply)
        except Exception:  # logged, never raised into the health check
            log.exception("refreshing the models failed")

    async def _serving(self, query: str | None) -> ServingModel:
        """The loaded model a request names (raises :class:`NoModel`, :class:`ModelLoadError`)."""
        name = self._models.pick(query, serve.get_multiplexed_model_id())
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
        health = self._health()
        return JSONResponse(health, status_code=503 if health["status"] == "loading" else 200)

    @api.get("/v1/replicas")
    async def replicas(self) -> JSONResponse:
        """Every live replica's last ``/healthz`` answer (replica id -> answer), reported at
        each health check and change of models: one answer covers the replicas that Serve's
        locality routing would never let a caller reach."""
        try:
            reports = await self._pins.reports()
        except Exception as e:  # the actor restarting: this replica's own report only
            log.warning("cannot read the replicas' reports: %s", e)
            reports = {}
        me = self._health()
        reports[me["replica"]] = me
        return JSONResponse({"replica": me["replica"], "replicas": reports})

    def _health(self) -> dict[str, Any]:
        """What ``/healthz`` answers."""
        replica = serve.get_replica_context().replica_id.unique_id
        models = self._models
        if models.settings is None:
            return {"status": "loading", "replica": replica}
        loaded = models.loaded_versions()
        out: dict[str, Any] = {
            "status": "degraded" if models.reload_error else "ok",
            "replica": replica,
            "loaded": loaded,
            # the version of each served name on every replica of this deploy
            "pinned": models.pinned_versions(),
            "models": models.settings.named_models(),
            "requested": models.requested,
            "last_reload_error": models.reload_error,
        }
        if len(models.settings.named_models()) == 1 and len(loaded) == 1:
            out["model_version"] = next(iter(loaded.values()))  # the single-bundle form
        return out

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        """Every served name with its bundle URI and version, and whether it is loaded on
        the replica answering (each replica holds its own LRU)."""
        from mspray.artifacts.bundle import read_meta

        settings = self._models.settings
        if settings is None:
            return error(503, "not configured yet")

        def describe(name: str, uri: str) -> dict[str, Any]:
            entry: dict[str, Any] = {"name": name, "uri": uri, "version": None}
            try:
                entry["version"] = read_meta(uri).get("version")
            except Exception as e:  # listed anyway: a broken bundle is what one looks for
                entry["error"] = f"{type(e).__name__}: {e}"
            slot = self._models.slots.get(name)
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
        info = current.describe()
        info["last_reload_error"] = self._models.reload_error
        return JSONResponse(info)

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
                "loaded_models": sorted(self._models.slots),
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

    Bundle roots are not resolved here: Serve runs the builder only when ``args`` or the
    code change, not for a redeploy of the same file, so the replicas pin them per deploy
    (:mod:`mspray.ray.serve.pins`). The id drawn here tells apart two imperative
    ``serve.run`` deploys, which share Serve's deploy time.
    """
    cfg = args if isinstance(args, ServeConfig) else validate(ServeConfig, args or {}, "args")
    options = deployment_options(cfg)  # validates before anything is bound
    return MSPrayDetector.options(**options).bind(cfg.model_dump(), uuid.uuid4().hex[:12])
