"""The per-patient daily cap as the dispatcher applies it (the decision is connector.cap's, pure).

A notification ready to send is counted against its patient's emails of the local day (the source's zone)
in the ledger, plus those this process has let through and not yet finished (`reserved`), under one lock
so that two sends prepared at once cannot both take the last place. Replicas count each other through the
ledger only: two of them may, at the same moment, each let one more through.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import TYPE_CHECKING

from connector.cap import Deferred, Skipped, local_day, over_cap
from connector.crm.appointments import CONTACT
from connector.timing import QuietHours

if TYPE_CHECKING:
    from datetime import datetime

    from connector.config import Config
    from connector.ledger import NotificationRecord
    from connector.ledger.abc import Caps


class DailyCap:
    def __init__(self, config: Config, store: Caps) -> None:
        self.config = config
        self.store = store
        self.limit = config.limits.per_patient_per_day
        quiet = config.quiet_hours
        self.quiet = QuietHours(quiet.start, quiet.end) if quiet else None
        self.reserved: dict[tuple[str, str], set[int]] = defaultdict(set)
        self._lock = asyncio.Lock()

    def zone(self, source: str) -> str:
        if source in self.config.sources:
            return self.config.sources[source].timezone
        if source in self.config.crm:
            return self.config.crm[source].timezone
        return "UTC"

    async def check(self, n: NotificationRecord, now: datetime) -> Deferred | Skipped | None:
        """None: it may go (its place is reserved until `done`); else deferred or skipped, with the reason."""
        if self.limit is None or not names_a_patient(n):
            return None
        who, zone = (n.source, n.patient_id), self.zone(n.source)
        since, until = local_day(now, zone)
        async with self._lock:
            # A snapshot: a reserved send may finish during the query; it is counted once either way.
            mine = sorted(self.reserved.get(who, ()))
            count = await self.store.sent_between(n.source, n.patient_id, since, until, mine) + len(mine)
            verdict = over_cap(
                count=count,
                limit=self.limit,
                now=now,
                zone=zone,
                quiet=self.quiet,
                start=n.appointment_start,
                mode=self.config.limits.over_cap,
            )
            if verdict is None:
                self.reserved[who].add(n.id)
            return verdict

    def done(self, notifications: list[NotificationRecord]) -> None:
        """These have been sent or put back: the ledger counts them from now on."""
        for n in notifications:
            mine = self.reserved.get((n.source, n.patient_id))
            if mine is not None:
                mine.discard(n.id)
                if not mine:
                    del self.reserved[(n.source, n.patient_id)]


def names_a_patient(n: NotificationRecord) -> bool:
    """Whether the notification's patient id is one person's: a CRM event names none (""), a CRM appointment
    without a `contact:` path gives every appointment the same placeholder. Those are not capped: counted
    together, one patient's cap would hold back every email of the source."""
    return bool(n.patient_id) and not (n.resource_type == "CrmAppointment" and n.patient_id == CONTACT)
