"""CRM events after they are safely in the inbox: planned with the mappings, prepared when due, purged.

Processing reads unprocessed inbox events, opens them, plans their notifications and, in one transaction,
records the notifications and marks the events processed: a crash in between processes them again, and the
notification keys keep that from adding anything twice. At send time the event is opened again (nothing
but the sealed inbox row holds its content) and the address read with the mapping's `recipient.path`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import structlog

from connector import metrics, optout
from connector.addresses import usable
from connector.config import Config
from connector.crm.hubspot import HubSpotClient
from connector.crm.inbox import Keyring, SealError
from connector.errors import ResourceError, SourceError
from connector.intake import check_storable, reason
from connector.ledger import NotificationRecord, SeenVersion
from connector.ledger.sql import SqlLedger, unavailable
from connector.logs import safe_text, where
from connector.mapping.engine import RenderError, plan_crm, render_crm
from connector.mapping.loader import Mapping, MappingSet
from connector.models import Clock, Email, PlannedNotification, State
from connector.timing import QuietHours

log = structlog.get_logger("connector.crm")
Outcome = tuple[Any, list[PlannedNotification], SeenVersion | None]  # inbox row, its notifications, quarantine


@dataclass(frozen=True)
class NotSendable:
    state: State
    reason: str


@dataclass(frozen=True)
class NotYet:
    """Cannot be prepared now (the CRM's API is unreachable): the notification waits for the next pass."""

    reason: str


class CrmProcessor:
    def __init__(
        self,
        config: Config,
        mappings: MappingSet,
        ledger: SqlLedger,
        keyring: Keyring,
        clock: Clock,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.mappings = mappings
        self.ledger = ledger
        self.keyring = keyring
        self.clock = clock
        self.apis = {
            name: HubSpotClient(name, settings, transport)
            for name, settings in config.crm.items()
            if settings.kind == "hubspot" and settings.api_token is not None
        }
        quiet = config.quiet_hours
        self.quiet = QuietHours(quiet.start, quiet.end) if quiet else None

    def _open(self, row: Any) -> dict[str, Any]:
        event: Any = self.keyring.open(row.key_id, row.source, row.event_id, row.sealed)
        if not isinstance(event, dict):
            raise ResourceError(f"CRM event {row.id} of {row.source!r} is not a JSON object")
        return event

    def _plan_event(self, row: Any) -> list[PlannedNotification]:
        """The notifications one stored event calls for; raises whatever is wrong with this event."""
        planned = self._plan(row, self._open(row))
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
        rows = await asyncio.to_thread(self.ledger.inbox_pending, limit)
        if not rows:
            return 0
        outcomes = [self._outcome(row) for row in rows]
        try:
            inserted = await asyncio.to_thread(
                self.ledger.inbox_commit,
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
                inserted += await asyncio.to_thread(
                    self.ledger.inbox_commit, [row.id], planned, [(row.source, problem)] if problem else []
                )
            except Exception as exc:
                if unavailable(exc):
                    raise
                refused = quarantine(row, exc, "recording")
                outcomes[index] = (row, [], refused)
                await asyncio.to_thread(self.ledger.inbox_commit, [row.id], [], [(row.source, refused)])
        return inserted

    async def replay(
        self, source: str, since: datetime | None, until: datetime | None
    ) -> tuple[list[PlannedNotification], list[tuple[str, SeenVersion]]]:
        """Plan the stored events of a window again (nothing is recorded: the caller decides). Returns the
        notifications and the events that cannot be processed."""
        rows = await asyncio.to_thread(self.ledger.inbox_window, source, since, until)
        outcomes = [self._outcome(row) for row in rows]
        return ([n for _, planned, _ in outcomes for n in planned], [(row.source, q) for row, _, q in outcomes if q])

    async def purge(self) -> int:
        assert self.config.inbox is not None
        removed = await asyncio.to_thread(self.ledger.inbox_purge, self.clock() - self.config.inbox.retention)
        if removed:
            log.info("crm.purged", events=removed)
        return removed

    async def aclose(self) -> None:
        for api in self.apis.values():
            await api.aclose()

    async def prepare(self, n: NotificationRecord, mapping: Mapping, now: datetime) -> Email | NotSendable | NotYet:
        """The email for a due CRM notification, or why it cannot be sent (now, or at all)."""
        row = await asyncio.to_thread(self.ledger.inbox_get, int(n.resource_id))
        if row is None:
            return NotSendable(State.SKIPPED, "the CRM event is no longer in the inbox (past its retention)")
        try:
            event = self._open(row)
        except (ResourceError, SealError) as exc:
            return NotSendable(State.FAILED, str(exc))
        if mapping.spec.fetch_object:
            api = self.apis.get(row.source)
            if api is None or not event.get("object_id"):
                return NotSendable(
                    State.FAILED, "fetch_object needs a hubspot source with api_token and an event with an object id"
                )
            try:
                event["object"] = await api.read(str(event.get("event_type")), str(event["object_id"]))
            except SourceError as exc:
                return NotYet(str(exc))
            if event["object"] is None:
                return NotSendable(State.SKIPPED, "the CRM object no longer exists")
        assert mapping.recipient is not None
        try:
            found = mapping.recipient(event)
        except Exception as exc:  # noqa: BLE001 - fhirpathpy raises bare Exception
            return NotSendable(State.FAILED, f"recipient path failed ({type(exc).__name__})")
        address = next((v for v in found if usable(v)), None)  # as it is: never trimmed or split
        if address is None:
            return NotSendable(
                State.SKIPPED, f"the {row.event_type} event has no usable email address at the recipient path"
            )
        match = await asyncio.to_thread(self.ledger.opted_out, optout.candidates([], address))
        if match is not None:
            return NotSendable(State.SKIPPED, f"the address opted out ({match.created_at.date().isoformat()})")
        zone = self.config.crm[row.source].timezone if row.source in self.config.crm else "UTC"
        try:
            return render_crm(
                mapping,
                key=n.key,
                to=address,
                event=event,
                source=row.source,
                timezone=zone,
                locale=self.config.locale,
                now=now,
                default_from=self.config.delivery.from_address,
                default_reply_to=self.config.delivery.reply_to,
            )
        except RenderError as exc:
            return NotSendable(State.FAILED, str(exc))


def quarantine(row: Any, exc: BaseException, stage: str) -> SeenVersion:
    """The record of a CRM event that cannot be processed: kept with the seen resource versions, as
    `CrmEvent/<inbox id>` at version `<event id>`."""
    return SeenVersion("CrmEvent", str(row.id), safe_text(row.event_id, 128), None, reason(exc, stage))
