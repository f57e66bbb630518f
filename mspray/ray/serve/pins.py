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

The same actor keeps each replica's last report (its ``/healthz`` answer: the versions it
has loaded and pinned), sent at every health check and after every change of models, so a
rollout is verified on every replica from one answer (``GET /v1/replicas``, any replica),
whichever replicas the proxy's locality routing lets a caller reach.

The actor outlives the node it runs on: it runs on the head node (a 0-CPU actor fits the
0-CPU head of cluster.yaml and of deploy/kubernetes), which is there as long as the cluster
is; Ray restarts it if it fails (``max_restarts=-1``, calls in flight retried), and a replica
whose handle died (the actor was killed or lost for good) looks it up, or starts it, again.
A restarted actor has lost its pins: every replica's report (each health check) and pin
request carry the versions it serves for its deploy, which are pinned again where nothing
is, so the survivors, not ``latest``, decide what a replica started afterwards serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("ray.serve")

#: Name and namespace of the detached actor holding the pins of every mspray application.
PINS_ACTOR = "mspray-bundle-pins"
PINS_NAMESPACE = "mspray"
#: Deploys of one application whose pins are kept (older replicas may still ask).
KEEP_DEPLOYS = 4
#: A replica report older than this is dropped (the replica is gone: live ones report at
#: every health check, 10 s apart by default).
REPORT_TTL_S = 120.0
#: Ray's resource of the head node (a tiny amount of it places an actor there).
HEAD_RESOURCE = "node:__internal_head__"


class _PinStore:
    """The pins: (application, deploy id) -> root URI -> version URI; the first offer of a
    URI for a deploy wins. And each replica's last report: application -> replica id ->
    (when, report)."""

    def __init__(self) -> None:
        self._pins: dict[tuple[str, str], dict[str, str]] = {}
        self._reports: dict[str, dict[str, tuple[float, dict[str, Any]]]] = {}
        self.started = time.time()

    def started_at(self) -> float:
        """When this instance started (a restart starts a new one)."""
        return self.started

    def report(
        self, app: str, replica: str, health: dict[str, Any], served: dict[str, dict[str, str]]
    ) -> None:
        """Keep ``replica``'s report, and pin what it serves (deploy id -> URI -> version)
        where nothing is pinned: after a restart the survivors' versions win."""
        self._reports.setdefault(app, {})[replica] = (time.time(), health)
        for deploy_id, pins in served.items():
            self.pin(app, deploy_id, pins)

    def reports(self, app: str) -> dict[str, dict[str, Any]]:
        """Replica id -> its last report, of the replicas that reported lately."""
        now = time.time()
        live = {r: v for r, v in self._reports.get(app, {}).items() if now - v[0] < REPORT_TTL_S}
        self._reports[app] = live
        return {r: health for r, (_, health) in live.items()}

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
    from mspray.artifacts.bundle import resolve_bundle

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

    async def report(self, replica: str, health: dict[str, Any]) -> None:
        """Keep this replica's report where the others' are (nowhere outside Serve)."""

    async def reports(self) -> dict[str, dict[str, Any]]:
        """Every live replica's last report (none outside Serve)."""
        return {}

    async def pin(self, deploy_id: str | None, uris: list[str]) -> dict[str, str | Exception]:
        """URI -> the version URI it stands for now, or the error resolving it."""
        return await asyncio.to_thread(_resolve, uris)


class ServePins(LocalPins):
    """The pins of Serve application ``app``, deploy ``build_id`` (see the module doc)."""

    def __init__(self, app: str, build_id: str | None) -> None:
        self.app, self.build_id = app, build_id
        self._store: Any = None
        self._served: dict[tuple[str, str], str] = {}  # (deploy id, URI) -> version pinned

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
                    resources={HEAD_RESOURCE: 0.001},
                    max_restarts=-1,
                    max_task_retries=-1,
                )
                .remote()
            )
        return self._store

    async def _call(self, method: str, *args: Any) -> Any:
        """``method`` of the actor; a handle that died is looked up (or started) again once."""
        from ray.exceptions import RayActorError

        try:
            return await getattr(self._actor(), method).remote(*args)
        except RayActorError as e:
            log.warning("the pins actor is gone (%s): looking it up again", e)
            self._store = None
            return await getattr(self._actor(), method).remote(*args)

    async def report(self, replica: str, health: dict[str, Any]) -> None:
        served: dict[str, dict[str, str]] = {}
        for (deploy_id, uri), version in self._served.items():
            served.setdefault(deploy_id, {})[uri] = version
        try:
            await self._call("report", self.app, replica, health, served)
        except Exception as e:  # not fatal: the next health check reports again
            log.warning("cannot report to the pins actor: %s", e)

    async def reports(self) -> dict[str, dict[str, Any]]:
        return await self._call("reports", self.app)

    async def pin(self, deploy_id: str | None, uris: list[str]) -> dict[str, str | Exception]:
        """URI -> the version URI pinned for this deploy (resolved here when no replica
        pinned it yet), or the error resolving it."""
        resolved = await super().pin(deploy_id, uris)
        if deploy_id is None:
            return resolved
        offers = {u: v for u, v in resolved.items() if isinstance(v, str)}
        # what this replica already serves for the deploy first: a restarted actor is
        # re-seeded by the survivors, not by wherever `latest` points now
        offers.update({u: v for (d, u), v in self._served.items() if d == deploy_id})
        pinned = await self._call("pin", self.app, deploy_id, offers)
        self._served = {(deploy_id, u): v for u, v in pinned.items()}  # this deploy's only
        out: dict[str, str | Exception] = {}
        for uri in uris:
            # a root that no longer resolves still serves the version pinned for it
            out[uri] = pinned.get(uri, resolved[uri])
            if pinned.get(uri) not in (None, resolved[uri]):
                log.info("%s: serving %s, pinned for this deploy", uri, pinned[uri])
        return out
