"""CRM events after they are safely in the inbox (connector.web.crm stored them): planned with the mappings,
and purged after their retention. Events that describe an appointment (`crm.<name>.appointment`) also feed
the appointment lifecycle (connector.intake.crm_appointments), in the order they were received.

Processing reads unprocessed inbox events, opens them, plans their notifications and, in one transaction,
records the notifications and marks the events processed: a crash in between processes them again, and the
notification keys keep that from adding anything twice. At send time the event is opened again by its
preparer (connector.sending.crm).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from connector import metrics
from connector.crm.inbox import Keyring, open_event
from connector.errors import LedgerError, SourceError
from connector.intake.checks import check_storable, reason
from connector.intake.crm_appointments import CrmAppointments, Told, withdraw_planned
from connector.ledger import SeenVersion
from connector.ledger.engine import unavailable
from connector.logs import safe_text, where
from connector.mapping.engine import plan_crm
from connector.models import Clock, PlannedNotification
from connector.timing import QuietHours

if TYPE_CHECKING:
    import httpx

    from connector.config import Config
    from connector.crm.appointments import Deleted, Described
    from connector.ledger.abc import Inbox, Intake
    from connector.mapping.loader import MappingSet

log = structlog.get_logger("connector.crm")
Outcome = tuple[Any, list[PlannedNotification], SeenVersion | None]  # inbox row, its notifications, quarantine
WAITING_BATCHES = 4  # batches read in one pass while events of a full batch wait for their CRM
INBOX_LOCK = "crm inbox"  # the advisory lock's name: no source is named so (names have no spaces)


@dataclass
class Processed:
    """One inbox event's share of a batch's transaction."""

    row: Any
    planned: list[PlannedNotification] = field(default_factory=list)
    problem: SeenVersion | None = None  # quarantined, or (no problem) a stale appointment event
    told: Told = field(default_factory=Told)


class CrmIntake:
    def __init__(
        self,
        config: Config,
        mappings: MappingSet,
        inbox: Inbox,
        keyring: Keyring,
        clock: Clock,
        intake: Intake | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.mappings = mappings
        self.inbox = inbox
        self.keyring = keyring
        self.clock = clock
        quiet = config.quiet_hours
        self.quiet = QuietHours(quiet.start, quiet.end) if quiet else None
        self.appointments = (
            CrmAppointments(config, mappings, intake, clock, self.quiet, transport)
            if intake is not None and any(c.appointment for c in config.crm.values())
            else None
        )

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
        a mapping or the source's appointment declaration expects, a key that cannot be stored, anything
        unexpected) is quarantined: marked processed with the reason, kept in the inbox until its retention,
        and out of the others' way. An appointment event whose CRM object cannot be read now waits for the
        next pass. Returns how many events were processed. With appointment declarations one replica at a
        time processes the inbox (each decides from the states the last one remembered)."""
        if self.appointments is None:
            return await self._process_pending(limit)
        lock = await self.appointments.intake.try_lock_source(INBOX_LOCK)
        if lock is False:
            log.debug("crm.skipped", problem="another replica is processing the inbox")
            return 0
        try:
            return await self._process_pending(limit)
        finally:
            await self.unlock_inbox(lock)

    async def lock_inbox(self, patience: float = 30.0) -> object:
        """The lock `process` takes, for a replay that records (PostgreSQL: it waits up to `patience` seconds
        while a replica processes the inbox; SQLite serves one process). Release with `unlock_inbox`. Raises
        LedgerError when the lock stays taken."""
        if self.appointments is None:
            return True
        deadline = time.monotonic() + patience
        while (lock := await self.appointments.intake.try_lock_source(INBOX_LOCK)) is False:
            if time.monotonic() >= deadline:
                raise LedgerError(f"another replica kept the CRM inbox for {patience:g} s; replay again later")
            await asyncio.sleep(0.2)
        return lock

    async def unlock_inbox(self, lock: object) -> None:
        if self.appointments is not None:
            await self.appointments.intake.unlock_source(lock)

    async def _process_pending(self, limit: int) -> int:
        """Batches of pending events. Events waiting for their CRM object stay pending at the head of the
        inbox: while a full batch left some waiting, the events after it are read too (a few batches per
        pass), so that one CRM being down does not hold up the others' events."""
        if self.appointments is not None:
            self.appointments.unreadable.clear()
        processed, after = 0, 0
        for _ in range(WAITING_BATCHES):
            rows = await self.inbox.pending(limit, after)
            if not rows:
                break
            done = await self._process(rows)
            await self._commit(done)
            processed += len(done)
            if len(rows) < limit or len(done) == len(rows):
                break
            after = rows[-1].id
        return processed

    async def _commit(self, done: list[Processed]) -> None:
        try:
            inserted = await self.inbox.commit(*_transaction(done))
        except Exception as exc:
            if unavailable(exc):
                raise
            log.error("crm.batch_refused", problem=where(exc), action="recording each event alone")
            inserted = await self._commit_each(done)
        quarantined = [p for p in done if p.problem is not None and p.problem.problem]
        for item in quarantined:
            assert item.problem is not None
            log.error("crm.quarantined", source=item.row.source, inbox=item.row.id, problem=item.problem.problem)
            metrics.inc("connector_quarantined_total", source=item.row.source)
        log.info("crm.processed", events=len(done), notifications=len(inserted), quarantined=len(quarantined))

    async def _process(self, rows: list[Any]) -> list[Processed]:
        """Open and plan each event, in the order received; appointment events against the states the batch
        has reached. Events waiting for their CRM object are left out (they stay pending)."""
        opened: list[tuple[Any, dict[str, Any] | None, Processed]] = []
        for row in rows:
            item = Processed(row)
            event: dict[str, Any] | None = None
            try:
                event = open_event(self.keyring, row)
                item.planned = self._plan(row, event)
                check_storable(item.planned)
                if self.appointments is None or not self.appointments.describes(row.source, event):
                    event = None
                elif not await self.appointments.complete(row.source, event):
                    continue
            except Exception as exc:  # noqa: BLE001 - one event is quarantined, whatever went wrong
                item.planned, item.problem, event = [], quarantine(row, exc, "planning"), None
            opened.append((row, event, item))
        if self.appointments is None:
            return [item for _, _, item in opened]
        described = []
        for row, event, item in opened:
            if event is None:
                continue
            try:
                described.append((row, self.appointments.read(row.source, row.id, event), item))
            except Exception as exc:  # noqa: BLE001 - one event is quarantined, whatever went wrong
                item.planned, item.problem = [], quarantine(row, exc, "reading the appointment")
        await self.appointments.recall([(row.source, d) for row, d, _ in described])
        for index, (row, appointment, item) in enumerate(described):
            try:
                item.told = self.appointments.decide(row.source, row.id, row.event_id, appointment)
            except Exception as exc:  # noqa: BLE001 - one event is quarantined, whatever went wrong
                item.planned, item.problem = [], quarantine(row, exc, "planning the appointment")
                continue
            for _, _, earlier in described[:index]:
                withdraw_planned(earlier.told.notifications, item.told.withdrawals)
            item.problem = item.told.seen
        return [item for _, _, item in opened]

    async def _commit_each(self, done: list[Processed]) -> list[str]:
        """One transaction per event; an event the ledger refuses is quarantined (`done` is updated)."""
        inserted: list[str] = []
        for item in done:
            try:
                inserted += await self.inbox.commit(*_transaction([item]))
            except Exception as exc:
                if unavailable(exc):
                    raise
                item.planned, item.told = [], Told()
                item.problem = quarantine(item.row, exc, "recording")
                await self.inbox.commit([item.row.id], [], [(item.row.source, item.problem)])
        return inserted

    async def replay(
        self, source: str, since: datetime | None, until: datetime | None
    ) -> tuple[list[PlannedNotification], list[tuple[str, SeenVersion]]]:
        """Plan the stored events of a window again (nothing is recorded: the caller decides), appointment
        events through the lifecycle (`_replay_appointments`). Returns the notifications and the events that
        cannot be processed."""
        rows = await self.inbox.window(source, since, until)
        outcomes = [self._outcome(row) for row in rows]
        planned = [n for _, notifications, _ in outcomes for n in notifications]
        problems = {row.id: q for row, _, q in outcomes if q}
        if self.appointments is not None and self.appointments.declared(source):
            ok = [row for row in rows if row.id not in problems]
            planned += await self._replay_appointments(source, ok, problems)
        return planned, [(source, q) for q in problems.values()]

    async def _replay_appointments(
        self, source: str, window: list[Any], problems: dict[int, SeenVersion]
    ) -> list[PlannedNotification]:
        """The lifecycle again for the appointments the window's events describe: each one's stored events
        (before, in and after the window) in the order received, from first sight (as a FHIR replay), so a
        reminder a later event withdrew or re-armed is not planned again. Only what the window's events plan
        is returned; nothing is withdrawn and no state moves. Raises SourceError when the CRM cannot be read."""
        assert self.appointments is not None
        inside = {row.id for row in window}
        self.appointments.unreadable.clear()
        objects: dict[tuple[str, str], Any] = {}
        wanted: set[str] = set()
        described: list[tuple[Any, Described | Deleted]] = []
        every = await self.inbox.window(source, None, None)
        for row in sorted(every, key=lambda r: r.id not in inside):  # the window's first: they name the wanted
            try:
                event = open_event(self.keyring, row)
                if not self.appointments.describes(source, event):
                    continue
                named = self.appointments.appointment_id(source, event)
                if row.id not in inside and (named is None or named not in wanted):
                    continue
                if not await self.appointments.complete(source, event, objects):
                    raise SourceError(f"crm source {source!r}: the CRM cannot be read now; replay again later")
                appointment = self.appointments.read(source, row.id, event)
            except SourceError:
                raise
            except Exception as exc:  # noqa: BLE001 - one event is quarantined, whatever went wrong
                if row.id in inside:
                    problems[row.id] = quarantine(row, exc, "reading the appointment")
                continue
            if row.id in inside:
                wanted.add(appointment.appointment_id)
            if appointment.appointment_id in wanted:
                described.append((row, appointment))
        described.sort(key=lambda pair: pair[0].id)
        await self.appointments.recall([(source, d) for _, d in described], first_sight=True)
        told: list[tuple[int, Told]] = []
        met: set[str] = set()
        for row, appointment in described:
            try:
                item = self.appointments.decide(source, row.id, row.event_id, appointment)
            except Exception as exc:  # noqa: BLE001 - one event is quarantined, whatever went wrong
                if row.id in inside:
                    problems[row.id] = quarantine(row, exc, "planning the appointment")
                continue
            if item.states and appointment.appointment_id not in met:
                met.add(appointment.appointment_id)
                self.appointments.first_sight(source, item)
            for _, earlier in told:
                withdraw_planned(earlier.notifications, item.withdrawals)
            told.append((row.id, item))
        return [n for inbox_id, item in told if inbox_id in inside for n in item.notifications]

    async def aclose(self) -> None:
        if self.appointments is not None:
            await self.appointments.aclose()

    async def purge(self) -> int:
        assert self.config.inbox is not None
        removed = await self.inbox.purge(self.clock() - self.config.inbox.retention)
        if removed:
            log.info("crm.purged", events=removed)
        return removed


def _transaction(done: list[Processed]) -> tuple[Any, ...]:
    """The arguments of `Inbox.commit` for these events."""
    return (
        [p.row.id for p in done],
        [n for p in done for n in (*p.planned, *p.told.notifications)],
        [(p.row.source, p.problem) for p in done if p.problem is not None],
        [state for p in done for state in p.told.states],
        [w for p in done for w in p.told.withdrawals],
    )


def quarantine(row: Any, exc: BaseException, stage: str) -> SeenVersion:
    """The record of a CRM event that cannot be processed: kept with the seen resource versions, as
    `CrmEvent/<inbox id>` at version `<event id>`."""
    return SeenVersion("CrmEvent", str(row.id), safe_text(row.event_id, 128), None, reason(exc, stage))
