"""The pins actor (one bundle version per deploy, :mod:`mspray.ray.serve.pins`) outlives its
own loss: Ray restarts it, a replica whose handle died looks
it up again, and the replicas that survive re-seed a restarted actor with the version they
serve, so a replica started afterwards serves that version too, not what ``latest`` names
by then."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mspray.ray.serve.pins import PINS_ACTOR, PINS_NAMESPACE, ServePins

pytestmark = pytest.mark.ray


def _root(tmp_path: Path) -> str:
    """A bundle root with versions v1 and v2 (only what resolving reads), ``latest`` = v1."""
    for version in ("v1", "v2"):
        (tmp_path / "versions" / version).mkdir(parents=True)
        (tmp_path / "versions" / version / "meta.json").write_text("{}")
    (tmp_path / "latest").write_text("v1\n")
    return str(tmp_path)


def _lose_pins_actor(ray, no_restart: bool) -> None:
    """Kill the actor (as the loss of its node does); return once that took effect: a new
    instance answers (restarted), or the old handle is dead (killed for good)."""
    from ray.exceptions import GetTimeoutError, RayActorError

    actor = ray.get_actor(PINS_ACTOR, namespace=PINS_NAMESPACE)
    started = ray.get(actor.started_at.remote())
    ray.kill(actor, no_restart=no_restart)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if ray.get(actor.started_at.remote(), timeout=10) != started:
                return
        except RayActorError:
            return
        except GetTimeoutError:
            pass  # restarting (a new worker process)
        time.sleep(0.2)
    raise AssertionError("the pins actor was not lost")


@pytest.mark.parametrize("no_restart", [False, True], ids=["restarted", "killed-for-good"])
def test_pins_survive_the_loss_of_their_actor(ray_local, tmp_path, no_restart):
    ray = ray_local
    root = _root(tmp_path)
    app = f"pins-{tmp_path.name}"  # one application per test: the actor is shared
    v1 = str(Path(root) / "versions" / "v1")

    async def scenario() -> tuple[str | Exception, str | Exception]:
        survivor = ServePins(app, "build")
        assert (await survivor.pin("deploy-1", [root]))[root] == v1
        (Path(root) / "latest").write_text("v2\n")  # build-bank moved the root meanwhile
        await asyncio.to_thread(_lose_pins_actor, ray, no_restart)  # its node is gone
        # the survivor's health check reaches an actor again and re-seeds it with v1 ...
        await survivor.report("survivor", {"status": "ok"})
        assert set(await survivor.reports()) == {"survivor"}
        # ... so a replica started for the same deploy serves v1, like its peers
        newcomer = (await ServePins(app, "build").pin("deploy-1", [root]))[root]
        again = (await survivor.pin("deploy-1", [root]))[root]
        return again, newcomer

    again, newcomer = asyncio.run(scenario())
    assert again == v1
    assert newcomer == v1
