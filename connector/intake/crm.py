"""CRM events after they are safely in the inbox (connector.web.crm stored them): planned with the mappings,
and purged after their retention.

Processing reads unprocessed inbox events, opens them, plans their notifications and, in one transaction,
records the notifications and marks the events processed: a crash in between processes them again, and the
notification keys keep that from adding anything twice. At send time the event is opened again by its
preparer (connector.sending.crm).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from connector import metrics
from connector.crm.inbox import Keyring, open_event
from connector.intake.checks import check_storable, reason
from connector.ledger import SeenVersion
from connector.ledger.engine import unavailable
from connector.logs import safe_text, where
from connector.mapping.engine import plan_crm
from connector.models import Clock, PlannedNotification
from connector.timing import QuietHours

if TYPE_CHECKING:
    from connector.config import Config
    from connector.ledger.abc import Inbox
    from connector.mapping.loader import MappingSet

log = structlog.get_logger("connector.crm")
Outcome = tuple[Any, list[PlannedNotification], SeenVersion | None]  # inbox row, its notifications, quarantine


class CrmIntake:
    def __init__(self, config: Config, mappings: MappingSet, inbox: Inbox, keyring: Keyring, clock: Clock) -> None:
        self.config = config
        self.mappings = mappings
        self.inbox = inbox
        self.keyring = keyring
        self.clock = clock
        quiet = config.quiet_hours
        self.quiet = QuietHours(quiet.start, quiet.end) if quiet else None

    def _plan_event(self, row: Any) -> list[PlannedNotification]:
        """The notifications one stored event calls for; raises whatever is wrong with this event."""
        planned = self._plan(row, open_event(self.keyring, row))
        check_storable(planned)
        return planned

    def _outcome(self, row: Any) -> Outcome:
        try:
            return row, self._plan_event(row), None
        except Exception as exc:  # noqa: BLE001 - one event is quarantined, whatever went wrong
            return row, [], quarantine(row, exc, "planning")

    def _plan(self, row: Any, event: dict[str, Any]) -> list[PlannedNotification]:
        zone = self.config.crm[row.source].timezone if row.source in self.config.crm else "UTC"
        result = plan_crm(
            self.mappings,
            source=row.source,
            inbox_id=row.id,
            event=event,
            now=self.clock(),
            zone=zone,
            quiet=self.quiet,
        )
        for note in result.notes:
            log.error("mapping.failed", mapping=note.mapping, source=row.source, problem=note.message)
        return result.notifications

    async def process(self, limit: int = 500) -> int:
        """Plan every unprocessed inbox event. An event that cannot be processed (unreadable, not the shape
        a mapping expects, a key that cannot be stored, anything unexpected) is quarantined: marked processed
        with the reason, kept in the inbox until its retention, and out of the others' way. Returns how many
        events were processed."""
        rows = await self.inbox.pending(limit)
        if not rows:
            return 0
        outcomes = [self._outcome(row) for row in rows]
        try:
            inserted = await self.inbox.commit(
                [row.id for row, _, _ in outcomes],
                [n for _, planned, _ in outcomes for n in planned],
                [(row.source, q) for row, _, q in outcomes if q],
            )
        except Exception as exc:
            if unavailable(exc):
                raise
            log.error("crm.batch_refused", problem=where(exc), action="recording each event alone")
            inserted = await self._commit_each(outcomes)
        for row, _, problem in outcomes:
            if problem is not None:
                log.error("crm.quarantined", source=row.source, inbox=row.id, problem=problem.problem)
                metrics.inc("connector_quarantined_total", source=row.source)
        log.info(
            "crm.processed",
            events=len(outcomes),
            notifications=len(inserted),
            quarantined=sum(1 for _, _, q in outcomes if q),
        )
        return len(outcomes)

    async def _commit_each(self, outcomes: list[Outcome]) -> list[str]:
        """One transaction per event; an event the ledger refuses is quarantined (`outcomes` is updated)."""
        inserted: list[str] = []
        for index, (row, planned, problem) in enumerate(outcomes):
            try:
                inserted += await self.inbox.commit([row.id], planned, [(row.source, problem)] if problem else [])
            except Exception as exc:
                if unavailable(exc):
                    raise
                refused = quarantine(row, exc, "recording")
                outcomes[index] = (row, [], refused)
                await self.inbox.commit([row.id], [], [(row.source, refused)])
        return inserted

    async def replay(
        self, source: str, since: datetime | None, until: datetime | None
    ) -> tuple[list[PlannedNotification], list[tuple[str, SeenVersion]]]:
        """Plan the stored events of a window again (nothing is recorded: the caller decides). Returns the
        notifications and the events that cannot be processed."""
        rows = await self.inbox.window(source, since, until)
        outcomes = [self._outcome(row) for row in rows]
        return ([n for _, planned, _ in outcomes for n in planned], [(row.source, q) for row, _, q in outcomes if q])

    async def purge(self) -> int:
        assert self.config.inbox is not None
        removed = await self.inbox.purge(self.clock() - self.config.inbox.retention)
        if removed:
            log.info("crm.purged", events=removed)
        return removed


def quarantine(row: Any, exc: BaseException, stage: str) -> SeenVersion:
    """The record of a CRM event that cannot be processed: kept with the seen resource versions, as
    `CrmEvent/<inbox id>` at version `<event id>`."""
    return SeenVersion("CrmEvent", str(row.id), safe_text(row.event_id, 128), None, reason(exc, stage))
