"""The models of one replica (``ModelSlots``) driven directly, with real bundles and the real
loader, so the orderings that are races over HTTP are set exactly: a first load of a model
while a change of settings is being applied, and a failed change that is tried again."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import pytest

from mspray.artifacts.bundle import read_meta
from mspray.config import ServeConfig
from mspray.ray.metrics import ServeMetrics
from mspray.ray.serve.loading import load_detector
from mspray.ray.serve.slots import RETRY_MIN_S, ModelSlots

pytestmark = pytest.mark.ray


def _slots(loader=load_detector) -> ModelSlots:
    args = ServeConfig(max_num_models_per_replica=2, device="cpu")
    return ModelSlots(args, ServeMetrics(), loader=loader)


def _noop(settings: ServeConfig) -> None:
    pass


def test_a_first_load_during_a_swap_serves_the_new_bundle(ray_local, bundles):
    """x is loaded; a change moves x and y to bundle b, and x's new load is held. A first
    request for y in that window must neither load a's bundle (the settings being replaced)
    nor keep it: it ends up on b."""
    version_b = read_meta(bundles["b"])["version"]
    gate, held = threading.Event(), threading.Event()
    calls: list[str] = []

    def loader(uri: str, device: str, bank_gpu: bool):
        calls.append(uri)
        if read_meta(uri)["version"] == version_b and not held.is_set():
            held.set()  # the swap's load of x: wait for the test
            assert gate.wait(60)
        return load_detector(uri, device, bank_gpu)

    async def scenario():
        slots = _slots(loader)
        old = {"models": {"x": bundles["a"], "y": bundles["a"]}}
        await slots.reconfigure(old, slots.load, _noop)
        await slots.load("x")
        new = {"models": {"x": bundles["b"], "y": bundles["b"]}}
        swap = asyncio.create_task(slots.reconfigure(new, slots.load, _noop))
        await asyncio.to_thread(held.wait, 60)
        n_before = len(calls)
        first = asyncio.create_task(slots.load("y"))
        await asyncio.sleep(1.5)  # ample time to load a tiny bundle
        gate.set()
        await swap
        slot_y = await first
        return slots, slot_y, calls[n_before:]

    slots, slot_y, later_calls = asyncio.run(scenario())
    assert [read_meta(u)["version"] for u in later_calls] == [version_b], later_calls
    assert slots.reload_error is None
    assert slot_y.current.detector.version == version_b
    assert slots.loaded_versions() == {"x": version_b, "y": version_b}


def test_a_failed_change_is_tried_again(ray_local, bundles, tmp_path):
    """A change to a bundle that is not there yet keeps the old one serving; once the
    bundle appears, the retry that the health check starts swaps to it."""
    version_a = read_meta(bundles["a"])["version"]
    version_b = read_meta(bundles["b"])["version"]
    later = tmp_path / "uploaded-later"

    async def scenario():
        slots = _slots()
        await slots.reconfigure({"bundle_uri": bundles["a"]}, slots.load, _noop)
        await slots.reconfigure({"bundle_uri": str(later)}, slots.load, _noop)
        assert "no such bundle" in (slots.reload_error or "")
        assert slots.loaded_versions() == {"default": version_a}
        await slots.refresh(slots.load, _noop)  # too early: no retry yet
        assert slots.reload_error and slots.loaded_versions() == {"default": version_a}
        shutil.copytree(bundles["b"], later)
        deadline = time.monotonic() + 10 * RETRY_MIN_S
        while slots.reload_error and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            await slots.refresh(slots.load, _noop)  # what every health check starts
        return slots

    slots = asyncio.run(scenario())
    assert slots.reload_error is None
    assert slots.loaded_versions() == {"default": version_b}
    assert slots.settings is not None and slots.settings.bundle_uri == str(later)
