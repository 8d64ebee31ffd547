"""Resources seen by the poller, kept briefly in memory so the dispatcher need not read them again.

PHI lives here in memory only. Entries expire `ttl` after they were seen, on the pipeline's clock, so a
reminder due days later reads the appointment and the patient afresh (a change or a new address counts).
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from connector.fhir import last_updated

if TYPE_CHECKING:
    from connector.models import Clock


class ResourceCache:
    def __init__(self, clock: Clock, capacity: int = 20_000, ttl: timedelta = timedelta(minutes=5)) -> None:
        self._items: OrderedDict[tuple[str, str, str], tuple[datetime, dict[str, Any]]] = OrderedDict()
        self._clock = clock
        self._capacity = capacity
        self._ttl = ttl

    def put(self, source: str, resource: dict[str, Any]) -> None:
        """Remember `resource`, unless a newer version (by meta.lastUpdated) is already held."""
        key = (source, str(resource.get("resourceType")), str(resource.get("id")))
        held = self._items.get(key)
        if held is not None:
            old, new = last_updated(held[1]), last_updated(resource)
            if old is not None and new is not None and old > new:
                return
        self._items[key] = (self._clock(), resource)
        self._items.move_to_end(key)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def get(self, source: str, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        item = self._items.get((source, resource_type, resource_id))
        if item is None or abs(self._clock() - item[0]) > self._ttl:
            return None
        return item[1]

    def clear(self) -> None:
        self._items.clear()
