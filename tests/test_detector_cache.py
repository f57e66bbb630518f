"""DetectorCache: one LRU of loaded detectors keyed by (name, version)."""

from __future__ import annotations

import threading

import pytest

from mspray.detector_cache import DetectorCache


def _counting_loader():
    loads: list = []

    def load(key):
        loads.append(key)
        return {"key": key, "n": len(loads)}

    return load, loads


def test_loads_once_per_key_and_evicts_least_recently_used():
    load, loads = _counting_loader()
    evicted: list = []
    cache = DetectorCache(2, load, on_evict=lambda k, d: evicted.append(k))
    a = cache.get(("a", "v1"))
    assert cache.get(("a", "v1")) is a  # a hit does not reload
    cache.get(("b", "v1"))
    cache.get(("a", "v1"))  # a is now the most recently used: b goes first
    cache.get(("c", "v1"))
    assert loads == [("a", "v1"), ("b", "v1"), ("c", "v1")]
    assert evicted == [("b", "v1")]
    assert cache.keys() == [("a", "v1"), ("c", "v1")]
    assert ("b", "v1") not in cache and len(cache) == 2


def test_a_new_version_is_a_new_key_and_pop_drops_it():
    load, loads = _counting_loader()
    evicted: list = []
    cache = DetectorCache(3, load, on_evict=lambda k, d: evicted.append(k))
    old = cache.get(("m", "v1"))
    new = cache.get(("m", "v2"))
    assert old is not new and loads == [("m", "v1"), ("m", "v2")]
    assert cache.peek(("m", "v1")) is old
    assert cache.pop(("m", "v1")) is old and evicted == [("m", "v1")]
    assert cache.pop(("m", "v1")) is None and cache.peek(("m", "v1")) is None


def test_put_keeps_the_first_detector_stored_for_a_key():
    cache = DetectorCache(1, lambda k: object())
    first, second = object(), object()
    assert cache.put("k", first) is first
    assert cache.put("k", second) is first
    assert cache.get("k") is first


def test_concurrent_misses_end_with_one_detector_per_key():
    gate = threading.Barrier(4)

    def slow_load(key):
        gate.wait(timeout=10)  # every thread is inside the loader at once
        return object()

    cache = DetectorCache(2, slow_load)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("k"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(d) for d in got}) == 1 and len(cache) == 1


def test_capacity_below_one_is_refused():
    with pytest.raises(ValueError):
        DetectorCache(0, lambda k: k)
