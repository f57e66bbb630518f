"""A small LRU of loaded detectors, shared by every place that serves several bundles.

Scoring actors of a multi-model run and Serve replicas both keep a few detectors loaded
and drop the least recently used one when another is needed. Keys are whatever names a
loaded model uniquely, typically ``(name, version)``: a key never changes meaning, so a
new bundle version is a new key and is loaded next to the old one until the old one is
evicted or dropped.

Loading runs outside the lock (it takes seconds); two threads missing the same key at
once may both load it, and the first one stored wins, so every caller sees one detector
per key.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

Loader = Callable[[Any], Any]
OnEvict = Callable[[Any, Any], None]


class DetectorCache:
    """At most ``capacity`` detectors by key, least recently used evicted first.

    ``loader(key)`` loads the detector of a missing key; ``on_evict(key, detector)`` is
    called for every detector that leaves the cache (evicted or popped), outside the lock.
    """

    def __init__(self, capacity: int, loader: Loader, on_evict: OnEvict | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: a cache holds at least one detector")
        self.capacity = capacity
        self._loader = loader
        self._on_evict = on_evict
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        """The detector of ``key``, loaded on a miss; marks it most recently used."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return self.put(key, self._loader(key))

    def put(self, key: Hashable, detector: Any) -> Any:
        """Store ``detector`` under ``key`` (most recently used) unless another thread
        stored one first; returns the one stored. Evicts beyond ``capacity``."""
        evicted = []
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            self._items[key] = detector
            while len(self._items) > self.capacity:
                evicted.append(self._items.popitem(last=False))
        self._evicted(evicted)
        return detector

    def peek(self, key: Hashable) -> Any | None:
        """The detector of ``key`` if loaded, without loading it or changing the order."""
        with self._lock:
            return self._items.get(key)

    def pop(self, key: Hashable) -> Any | None:
        """Drop ``key``; returns its detector (None if it was not loaded)."""
        with self._lock:
            det = self._items.pop(key, None)
        if det is not None:
            self._evicted([(key, det)])
        return det

    def keys(self) -> list[Hashable]:
        """The loaded keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _evicted(self, items: list[tuple[Hashable, Any]]) -> None:
        if self._on_evict is not None:
            for key, det in items:
                self._on_evict(key, det)
