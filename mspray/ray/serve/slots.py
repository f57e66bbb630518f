"""The models of one Serve replica: settings, named slots, loading and the hot swap.

A replica serves named bundles (``ServeConfig.named_models()``). Serve's
``@serve.multiplexed`` LRU decides which names stay loaded on a replica (it also routes the
model-id header to the replica holding the model); each entry it holds is a
:class:`ModelSlot`, whose ``current`` :class:`ServingModel` is replaced in place by a hot
swap, so the LRU entry survives it. The detectors themselves live in a
:class:`~mspray.detector_cache.DetectorCache` keyed by the name and what a load depends on
(bundle URI, device, GPU bank search), so an unchanged model is never loaded twice.

No Serve import here: the deployment (:mod:`mspray.ray.serve.app`) passes in Serve's
multiplexed getter and applies the batching settings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mspray.config import ConfigError, ServeConfig, validate
from mspray.detector_cache import DetectorCache

# Serve's replica logger: lines land in the replica log with the request id.
log = logging.getLogger("ray.serve")

#: Seconds a failed model load is answered from memory before the next attempt.
LOAD_RETRY_S = 30.0


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
        """The :class:`DetectorCache` key of this model's detector."""
        return (self.name, *self.settings.model_key(self.uri))

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/model`` shows: version, scales, banks, threshold, settings."""
        import torch

        det = self.detector
        return {
            "model": self.name,
            "model_version": det.version,
            "bundle_uri": self.uri,
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
            "serving": self.settings.model_dump(),
            "limits": {
                "max_image_bytes": self.max_image_bytes,
                "max_image_pixels": self.max_image_pixels,
            },
            "loaded_at": self.loaded_at,
        }


class ModelSlot:
    """One named model in Serve's LRU (what the ``@serve.multiplexed`` loader returns).

    Serve calls ``__del__`` when it unloads the slot; it runs once (garbage collection
    calls it again).
    """

    def __init__(self, current: ServingModel, on_unload: Callable[[ModelSlot], None]):
        self.current = current
        self._on_unload = on_unload
        self._unloaded = False

    def __del__(self) -> None:
        if not self._unloaded:
            self._unloaded = True
            self._on_unload(self)


class ModelLoadError(RuntimeError):
    """A named model's bundle could not be loaded (HTTP 503 with this reason)."""


class NoModel(Exception):
    """A request names no served model: ``status`` 400 (ambiguous) or 404 (unknown)."""

    def __init__(self, status: int, message: str, models: list[str]):
        super().__init__(message)
        self.status, self.message, self.models = status, message, models


def serve_device(setting: str, gpu_ids: list) -> str:
    """The torch device of a replica: ``auto`` means CUDA only when this replica reserved
    a GPU (``num_gpus``); one without a reservation stays on the CPU even on a GPU node,
    where another actor owns the GPU."""
    if setting == "auto":
        return "cuda" if gpu_ids else "cpu"
    return setting


def load_detector(uri: str, device: str, bank_gpu: bool) -> Any:
    """Load the bundle at ``uri`` on ``device`` (a :class:`ServeConfig` device setting) and
    run one warm-up batch (lazy init off the request path)."""
    import ray
    import torch

    from mspray.bundle import load_bundle, load_config, resolve_bundle
    from mspray.device import resolve_device

    uri = resolve_bundle(uri)  # a root: its latest version now; both reads use that one
    # The bundle's own runtime settings, with the faiss search moved to the GPU if asked.
    config = load_config(uri, {"bank.use_gpu": True}) if bank_gpu else None
    det = load_bundle(
        uri, device=resolve_device(serve_device(device, ray.get_gpu_ids())), config=config
    )
    size = det.cfg.model.image_size
    det.predict(torch.zeros(1, 3, size, size))
    return det


def serving_model(name: str, uri: str, settings: ServeConfig, det: Any) -> ServingModel:
    """``det`` serving ``name`` from ``uri`` with the limits ``settings`` give it."""
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


GetModel = Callable[[str], Awaitable[ModelSlot]]


class ModelSlots:
    """The settings and loaded models of one replica.

    ``metrics`` is the replica's :class:`~mspray.ray.metrics.ServeMetrics`. The deployment
    calls :meth:`load` from its ``@serve.multiplexed`` loader and :meth:`reconfigure` from
    its own ``reconfigure``.
    """

    def __init__(self, args: ServeConfig, metrics: Any) -> None:
        self.args = args
        self.settings: ServeConfig | None = None
        self.slots: dict[str, ModelSlot] = {}  # what Serve's LRU holds on this replica
        self.requested: dict[str, str] | None = None  # the models of the last user_config
        self.reload_error: str | None = None
        self._load_errors: dict[tuple, tuple[str, float]] = {}  # key -> (reason, when)
        self._reload_lock = asyncio.Lock()
        self._metrics = metrics
        # Room for an old and a new detector of every loaded name during a swap; the old
        # one is dropped right after it.
        self._cache = DetectorCache(
            2 * args.max_num_models_per_replica, lambda key: load_detector(*key[1:])
        )

    def model_key(self, name: str, uri: str, settings: ServeConfig) -> tuple:
        return (name, *settings.model_key(uri))

    # ------------------------------------------------------------------ loading
    async def _loaded(self, name: str, uri: str, settings: ServeConfig) -> ServingModel:
        """``name`` served from ``uri`` under ``settings``, loaded off the event loop unless
        the cache holds it."""
        key = self.model_key(name, uri, settings)
        det = self._cache.peek(key)
        if det is None:
            log.info("loading model %s from %s", name, uri)
            det = await asyncio.to_thread(self._cache.get, key)
        return serving_model(name, uri, settings, det)

    async def load(self, name: str) -> ModelSlot:
        """The ``@serve.multiplexed`` loader: load ``name``'s bundle into a new slot.

        A failed load is remembered for :data:`LOAD_RETRY_S`, so a broken bundle answers
        503 quickly instead of being reloaded by every request (Serve loads one model at a
        time per replica)."""
        settings = self.settings
        assert settings is not None
        uri = settings.named_models()[name]
        key = self.model_key(name, uri, settings)
        failed = self._load_errors.get(key)
        if failed is not None and time.monotonic() - failed[1] < LOAD_RETRY_S:
            raise ModelLoadError(failed[0])
        try:
            current = await self._loaded(name, uri, settings)
        except Exception as e:
            reason = f"model {name!r} ({uri}) could not be loaded: {type(e).__name__}: {e}"
            self._load_errors[key] = (reason, time.monotonic())
            raise ModelLoadError(reason) from e
        slot = ModelSlot(current, self._unloaded)
        self.slots[name] = slot
        self._metrics.loaded(name, current.detector.version)
        return slot

    def _unloaded(self, slot: ModelSlot) -> None:
        """Serve's LRU dropped ``slot`` (called from ``ModelSlot.__del__``)."""
        name = slot.current.name
        if self.slots.get(name) is slot:
            del self.slots[name]
            self._cache.pop(slot.current.key)
        self._metrics.loaded(name, slot.current.detector.version, 0)
        log.info("unloaded model %s", name)

    def pick(self, query: str | None, header: str | None) -> str:
        """The served name a request asks for (raises :class:`NoModel`,
        :class:`ModelLoadError` before the first settings)."""
        if self.settings is None:
            raise ModelLoadError("not configured yet")
        return pick_model(self.settings.named_models(), query, header)

    def loaded_versions(self) -> dict[str, str]:
        """Name -> version of every model loaded on this replica."""
        return {n: s.current.detector.version for n, s in sorted(self.slots.items())}

    # ------------------------------------------------------------------ hot swap
    async def reconfigure(
        self,
        user_config: dict[str, Any] | None,
        get_model: GetModel,
        apply: Callable[[ServeConfig], None],
    ) -> None:
        """Apply a new ``user_config``: load every changed bundle of a loaded name first,
        then swap them; ``apply(settings)`` sets what the deployment applies itself.

        At start-up a bad config (or, with a single model, a bundle that cannot be loaded)
        raises, which fails the replica (Serve reports it). Later, a bundle that cannot be
        loaded keeps the current models serving; the error is logged and kept in
        :attr:`reload_error`, since failing here would take every replica down.
        """
        async with self._reload_lock:
            first = self.settings is None
            self.requested = None
            swaps: dict[str, ServingModel] = {}
            try:
                settings = apply_user_config(self.args, user_config)
                models = settings.named_models()
                self.requested = models
                if not models:
                    raise ConfigError("no model: set user_config.bundle_uri or user_config.models")
                for name in list(self.slots):
                    uri = models.get(name)
                    if uri is not None:  # else no longer served: 404 from now; the LRU drops it
                        swaps[name] = await self._loaded(name, uri, settings)
                apply(settings)
                for name, new in swaps.items():  # the swaps: one reference assignment each
                    old = self.slots[name].current
                    if new.detector is not old.detector:
                        self._metrics.loaded(name, old.detector.version, 0)
                        self._metrics.loaded(name, new.detector.version)
                        self._cache.pop(old.key)
                    self.slots[name].current = new
                self.settings = settings
                self._load_errors.clear()
                self.reload_error = None
                if first and len(models) == 1:
                    # one model: load it now, so a bad bundle fails the deployment at start
                    await get_model(next(iter(models)))
                log.info("serving models %s", models)
            except Exception as e:
                # detectors loaded for a swap that did not happen: nothing serves them
                serving = {id(s.current.detector) for s in self.slots.values()}
                for new in swaps.values():
                    if id(new.detector) not in serving:
                        self._cache.pop(new.key)
                if first:
                    self.settings = None
                    raise
                self.reload_error = f"{type(e).__name__}: {e}"
                log.exception("reconfigure failed; still serving the previous settings")
