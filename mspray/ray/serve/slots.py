"""The models of one Serve replica: settings, named slots, loading and the hot swap.

A replica serves named bundles (``ServeConfig.named_models()``). Serve's
``@serve.multiplexed`` LRU decides which names stay loaded on a replica (it also routes the
model-id header to the replica holding the model); each entry it holds is a
:class:`ModelSlot`, whose ``current`` :class:`ServingModel` is replaced in place by a hot
swap, so the LRU entry survives it. The detectors themselves live in a
:class:`~mspray.detector_cache.DetectorCache` keyed by the name and what a load depends on
(bundle version, device, GPU bank search), so an unchanged model is never loaded twice.

Three rules keep every replica on the intended version:

- a configured bundle *root* serves the version pinned for the current deploy
  (:mod:`mspray.ray.serve.pins`), the same on every replica, also on ones started later;
- a first load of a name waits while a change of settings is applied, and loads again if
  the settings changed under it, so no slot keeps a bundle of replaced settings;
- a change that failed (the new bundle could not be loaded) keeps the old models serving
  and is tried again, with a growing pause, from the health check (:meth:`ModelSlots.refresh`).

No Serve import here: the deployment (:mod:`mspray.ray.serve.app`) passes in Serve's
multiplexed getter and applies the batching settings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mspray.config import ConfigError, ServeConfig, validate
from mspray.detector_cache import DetectorCache
from mspray.ray.serve.loading import ServingModel, load_detector, probe, serving_model

# Serve's replica logger: lines land in the replica log with the request id.
log = logging.getLogger("ray.serve")

#: Seconds a failed model load is answered from memory before the next attempt.
LOAD_RETRY_S = 30.0
#: First and longest wait before a failed change of models is tried again (doubling).
RETRY_MIN_S = 2.0
RETRY_MAX_S = 120.0


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
Apply = Callable[[ServeConfig], None]


class ModelSlots:
    """The settings and loaded models of one replica.

    ``metrics`` is the replica's :class:`~mspray.ray.metrics.ServeMetrics`; ``pins`` resolves
    configured bundle URIs to the versions of the current deploy
    (:class:`~mspray.ray.serve.pins.ServePins` in a replica); ``loader(version_uri, device,
    bank_gpu)`` loads a detector. The deployment calls :meth:`load` from its
    ``@serve.multiplexed`` loader, :meth:`reconfigure` from its own ``reconfigure`` and
    :meth:`refresh` from its health check.
    """

    def __init__(
        self,
        args: ServeConfig,
        metrics: Any,
        pins: Any = None,
        loader: Callable[[str, str, bool], Any] = load_detector,
    ) -> None:
        from mspray.ray.serve.pins import LocalPins

        self.args = args
        self.settings: ServeConfig | None = None
        self.slots: dict[str, ModelSlot] = {}  # what Serve's LRU holds on this replica
        self.requested: dict[str, str] | None = None  # the models of the last user_config
        self.reload_error: str | None = None
        self.pinned: dict[str, str | Exception] = {}  # configured URI -> its version URI
        self.deploy_id: str | None = None
        self._pins = pins or LocalPins()
        self._user_config: dict[str, Any] | None = None
        self._load_errors: dict[tuple, tuple[str, float]] = {}  # key -> (reason, when)
        self._reload_lock = asyncio.Lock()
        # Set while no reconfigure runs: a first load waits for it, so it never loads a
        # bundle of the settings being replaced.
        self._settled = asyncio.Event()
        self._settled.set()
        self._generation = 0  # counts applied settings
        self._retry_at: float | None = None  # when a failed change is tried again
        self._retry_s = RETRY_MIN_S
        self._metrics = metrics
        # Room for an old and a new detector of every loaded name during a swap; the old
        # one is dropped right after it.
        self._cache = DetectorCache(
            2 * args.max_num_models_per_replica, lambda key: loader(*key[1:])
        )

    # ------------------------------------------------------------------ loading
    async def _loaded(self, name: str, uri: str, settings: ServeConfig) -> ServingModel:
        """``name`` served from ``uri`` (its pinned version) under ``settings``, loaded off
        the event loop unless the cache holds it."""
        version_uri = self.pinned.get(uri)
        if version_uri is None or isinstance(version_uri, Exception):
            # not pinned yet (a new URI), or its resolution failed before: try now
            self.pinned.update(await self._pins.pin(self.deploy_id, [uri]))
            version_uri = self.pinned[uri]
        if isinstance(version_uri, Exception):
            raise version_uri
        key = (name, *settings.model_key(version_uri))
        det = self._cache.peek(key)
        if det is None:
            log.info("loading model %s from %s", name, version_uri)
            det = await asyncio.to_thread(self._cache.get, key)
        return serving_model(name, uri, version_uri, settings, det)

    async def load(self, name: str) -> ModelSlot:
        """The ``@serve.multiplexed`` loader: load ``name``'s bundle into a new slot.

        Waits while a change of settings is applied, and loads again if the settings
        changed during its own load, so a slot never keeps a bundle of replaced settings.
        A failed load is remembered for :data:`LOAD_RETRY_S`, so a broken bundle answers
        503 quickly instead of being reloaded by every request (Serve loads one model at a
        time per replica)."""
        while True:
            await self._settled.wait()
            settings, generation = self.settings, self._generation
            if settings is None:
                raise ModelLoadError("not configured")
            uri = settings.named_models().get(name)
            if uri is None:
                raise ModelLoadError(f"model {name!r} is no longer served")
            key = (name, *settings.model_key(uri))
            failed = self._load_errors.get(key)
            if failed is not None and time.monotonic() - failed[1] < LOAD_RETRY_S:
                raise ModelLoadError(failed[0])
            try:
                current = await self._loaded(name, uri, settings)
            except Exception as e:
                reason = f"model {name!r} ({uri}) could not be loaded: {type(e).__name__}: {e}"
                if generation == self._generation:
                    self._load_errors[key] = (reason, time.monotonic())
                    raise ModelLoadError(reason) from e
                continue
            if generation == self._generation:
                break
            log.info("settings changed while model %s loaded: loading it again", name)
            if all(s.current.detector is not current.detector for s in self.slots.values()):
                self._cache.pop(current.key)
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

    def pinned_versions(self) -> dict[str, str | None]:
        """Name -> the version id every replica of this deploy serves for it (None where the
        bundle could not be resolved)."""
        from mspray import storage

        out: dict[str, str | None] = {}
        for name, uri in (self.settings.named_models() if self.settings else {}).items():
            version = self.pinned.get(uri)
            out[name] = storage.basename(version) if isinstance(version, str) else None
        return out

    async def check_health(self) -> None:
        """Run :func:`probe` on every loaded detector; raises if one fails."""
        for name, slot in list(self.slots.items()):
            try:
                await asyncio.to_thread(probe, slot.current.detector)
            except Exception as e:
                raise RuntimeError(
                    f"model {name!r} failed its health-check prediction: {type(e).__name__}: {e}"
                ) from e

    # ------------------------------------------------------------------ hot swap
    async def reconfigure(
        self, user_config: dict[str, Any] | None, get_model: GetModel, apply: Apply
    ) -> None:
        """Apply a new ``user_config``: pin its bundles for this deploy, load every changed
        bundle of a loaded name first, then swap them; ``apply(settings)`` sets what the
        deployment applies itself.

        At start-up a bad config (or, with a single model, a bundle that cannot be loaded)
        raises, which fails the replica (Serve reports it). Later, a bundle that cannot be
        loaded keeps the current models serving; the error is kept in
        :attr:`reload_error` (failing here would take every replica down) and the change is
        tried again by :meth:`refresh`, after 2, 4, 8 ... up to :data:`RETRY_MAX_S` seconds.
        """
        first = self.settings is None
        async with self._reload_lock:
            self._settled.clear()
            self._user_config = user_config
            self.requested = None
            swaps: dict[str, ServingModel] = {}
            previous = self.pinned
            try:
                settings = apply_user_config(self.args, user_config)
                models = settings.named_models()
                self.requested = models
                if not models:
                    raise ConfigError("no model: set user_config.bundle_uri or user_config.models")
                self.deploy_id = await self._pins.deploy_id()
                self.pinned = await self._pins.pin(self.deploy_id, sorted(set(models.values())))
                # until every loaded name has its new detector; a first load that finished
                # meanwhile added a slot, which is swapped too
                while pending := [n for n in self.slots if n in models and n not in swaps]:
                    for name in pending:
                        swaps[name] = await self._loaded(name, models[name], settings)
                apply(settings)
                for name, new in swaps.items():  # the swaps: one reference assignment each
                    old = self.slots[name].current
                    if new.detector is not old.detector:
                        self._metrics.loaded(name, old.detector.version, 0)
                        self._metrics.loaded(name, new.detector.version)
                        self._cache.pop(old.key)
                        log.info("model %s now serves %s", name, new.version_uri)
                    self.slots[name].current = new
                self.settings = settings
                self._generation += 1
                self._load_errors.clear()
                self.reload_error, self._retry_at, self._retry_s = None, None, RETRY_MIN_S
                log.info("serving models %s (versions %s)", models, self.pinned_versions())
            except Exception as e:
                # detectors loaded for a swap that did not happen: nothing serves them
                serving = {id(s.current.detector) for s in self.slots.values()}
                for new in swaps.values():
                    if id(new.detector) not in serving:
                        self._cache.pop(new.key)
                if first:
                    self.settings = None
                    raise
                self.pinned = previous  # what the models still served were loaded from
                self.reload_error = f"{type(e).__name__}: {e}"
                self._retry_at = time.monotonic() + self._retry_s
                self._retry_s = min(2 * self._retry_s, RETRY_MAX_S)
                log.exception("reconfigure failed; still serving the previous settings")
            finally:
                self._settled.set()
        if first and len(models) == 1:
            # one model: load it now, so a bad bundle fails the deployment at start
            try:
                await get_model(next(iter(models)))
            except Exception:
                self.settings = None
                raise

    async def refresh(self, get_model: GetModel, apply: Apply) -> None:
        """Apply the last ``user_config`` again when the application was deployed again
        (its roots may name new versions now) or a failed change is due for a retry."""
        if self.settings is None or self._reload_lock.locked():
            return
        due = self._retry_at is not None and time.monotonic() >= self._retry_at
        if not due:
            deploy_id = await self._pins.deploy_id()
            if deploy_id is None or deploy_id == self.deploy_id:
                return
            log.info("new deploy %s: resolving the bundles again", deploy_id)
        else:
            log.info("trying the failed change of models again")
        await self.reconfigure(self._user_config, get_model, apply)
