"""One bundle version per deploy: a bundle root in the config names the version its
``latest`` pointer named when the deploy was made, on every replica of that deploy.

A Serve config may name a bundle *root* (``user_config.bundle_uri: s3://models/screws``).
Were each replica to follow ``latest`` when it starts, a replica added later by
autoscaling, or started again after a node loss, could serve another version than its
peers. So the first replica of a deploy to resolve a root *pins* it: the version it found
is kept in a small detached actor, keyed by the application and the deploy, and every
other replica of the same deploy serves that version.

What is a deploy: Serve's ``last_deployed_time_s`` of the application, which every
``serve deploy`` (also of an unchanged file) and every REST ``PUT`` renews, together with
an id the app builder draws each time it runs (an imperative ``serve.run`` keeps the time).
A new deploy of the same root therefore resolves it again and the replicas swap to the new
version in place (they look for a new deploy at every health check).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("ray.serve")

#: Name and namespace of the detached actor holding the pins of every mspray application.
PINS_ACTOR = "mspray-bundle-pins"
PINS_NAMESPACE = "mspray"
#: Deploys of one application whose pins are kept (older replicas may still ask).
KEEP_DEPLOYS = 4


class _PinStore:
    """The pins: (application, deploy id) -> root URI -> version URI; the first offer of a
    URI for a deploy wins."""

    def __init__(self) -> None:
        self._pins: dict[tuple[str, str], dict[str, str]] = {}

    def pin(self, app: str, deploy_id: str, offers: dict[str, str]) -> dict[str, str]:
        key = (app, deploy_id)
        if key not in self._pins:
            self._pins[key] = {}
            of_app = [k for k in self._pins if k[0] == app]
            for old in of_app[:-KEEP_DEPLOYS]:  # insertion order: oldest first
                del self._pins[old]
        pins = self._pins[key]
        for uri, version in offers.items():
            pins.setdefault(uri, version)
        return dict(pins)


def _resolve(uris: list[str]) -> dict[str, str | Exception]:
    from mspray.bundle import resolve_bundle

    out: dict[str, str | Exception] = {}
    for uri in uris:
        try:
            out[uri] = resolve_bundle(uri)
        except Exception as e:  # per URI: one missing bundle must not hide the others
            out[uri] = e
    return out


class LocalPins:
    """No deploy to share: every call resolves the roots again (outside Serve)."""

    async def deploy_id(self) -> str | None:
        return None

    async def pin(self, deploy_id: str | None, uris: list[str]) -> dict[str, str | Exception]:
        """URI -> the version URI it stands for now, or the error resolving it."""
        return await asyncio.to_thread(_resolve, uris)


class ServePins(LocalPins):
    """The pins of Serve application ``app``, deploy ``build_id`` (see the module doc)."""

    def __init__(self, app: str, build_id: str | None) -> None:
        self.app, self.build_id = app, build_id
        self._store: Any = None

    async def deploy_id(self) -> str | None:
        """This application's current deploy, or None when Serve cannot say."""
        from ray import serve

        try:
            status = await asyncio.to_thread(serve.status)
            deployed = status.applications[self.app].last_deployed_time_s
        except Exception as e:  # not fatal: the roots are then resolved by each replica
            log.warning("cannot read the deploy time of %s: %s", self.app, e)
            return None
        return f"{deployed!r}/{self.build_id}"

    def _actor(self) -> Any:
        import ray

        if self._store is None:
            self._store = (
                ray.remote(_PinStore)
                .options(
                    name=PINS_ACTOR,
                    namespace=PINS_NAMESPACE,
                    lifetime="detached",
                    get_if_exists=True,
                    num_cpus=0,
                )
                .remote()
            )
        return self._store

    async def pin(self, deploy_id: str | None, uris: list[str]) -> dict[str, str | Exception]:
        """URI -> the version URI pinned for this deploy (resolved here when no replica
        pinned it yet), or the error resolving it."""
        resolved = await super().pin(deploy_id, uris)
        if deploy_id is None:
            return resolved
        offers = {u: v for u, v in resolved.items() if isinstance(v, str)}
        pinned = await self._actor().pin.remote(self.app, deploy_id, offers)
        out: dict[str, str | Exception] = {}
        for uri in uris:
            # a root that no longer resolves still serves the version pinned for it
            out[uri] = pinned.get(uri, resolved[uri])
            if pinned.get(uri) not in (None, resolved[uri]):
                log.info("%s: serving %s, pinned for this deploy", uri, pinned[uri])
        return out
