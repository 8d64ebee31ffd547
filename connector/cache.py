"""Resources seen by the poller, kept briefly in memory so the dispatcher need not read them again.

PHI lives here in memory only. Entries expire after `ttl` seconds so a reminder due days later reads the
patient afresh (a changed address must be used).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class ResourceCache:
    def __init__(self, capacity: int = 20_000, ttl: float = 300.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._items: OrderedDict[tuple[str, str, str], tuple[float, dict[str, Any]]] = OrderedDict()
        self._capacity = capacity
        self._ttl = ttl
        self._monotonic = monotonic

    def put(self, source: str, resource: dict[str, Any]) -> None:
        key = (source, str(resource.get("resourceType")), str(resource.get("id")))
        self._items[key] = (self._monotonic(), resource)
        self._items.move_to_end(key)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def get(self, source: str, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        item = self._items.get((source, resource_type, resource_id))
        if item is None or self._monotonic() - item[0] > self._ttl:
            return None
        return item[1]

    def clear(self) -> None:
        self._items.clear()
