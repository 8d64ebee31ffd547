"""Where events enter and are decided: poll a source page by page, diff, plan, and commit to the ledger.

For each page: validate the Appointments, drop the (id, version) pairs already seen, compare each with its
remembered state (connector.lifecycle), plan the transitions with the mappings, then commit in one
transaction: withdrawn and new notifications, the new states, the seen versions and the cursor. The cursor
is the highest `meta.lastUpdated` seen (server time, never ours); it moves after every page when the server
honoured `_sort=_lastUpdated`, otherwise only once every page of the poll is committed.

One resource version that cannot be processed (connector.intake) is quarantined alone: examined, decided
and checked one version at a time, and, should the ledger refuse a page for its data, recorded one version
at a time. Only an outage (of the source or the ledger) stops a poll.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from connector import fhir, metrics
from connector.cache import ResourceCache
from connector.config import Config
from connector.errors import ResourceError, SourceError
from connector.intake import Examined, Seen, check_storable, examine, later, reason, seen_key, triples
from connector.ledger import SeenVersion, Withdrawal
from connector.ledger.sql import SqlLedger, unavailable
from connector.lifecycle import Snapshot, Transition, appointment_zone, is_stale, snapshot, transitions
from connector.logs import safe_text, where
from connector.mapping.engine import Situation, plan
from connector.mapping.loader import MappingSet
from connector.models import Clock, PlannedNotification, PlanNote
from connector.results import PollReport
from connector.sources.fhir_poll import FhirPollSource
from connector.timing import QuietHours

log = structlog.get_logger("connector.pipeline")


def newest_per_id(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pure: the newest history entry of each appointment. History lists newest first, so the first entry of
    an id stands unless a later one is provably newer (a DELETE entry may carry no time at all)."""
    latest: dict[str, dict[str, Any]] = {}
    for raw in entries:
        known = latest.get(str(raw.get("id")))
        if known is None:
            latest[str(raw.get("id"))] = raw
            continue
        known_time, updated = fhir.last_updated(known), fhir.last_updated(raw)
        if updated is not None and known_time is not None and updated > known_time:
            latest[str(raw.get("id"))] = raw
    return latest


@dataclass
class Decision:
    """What a page (or a deletion) means for the ledger; committed in one transaction."""

    notifications: list[PlannedNotification] = field(default_factory=list)
    withdrawals: list[Withdrawal] = field(default_factory=list)
    snapshots: dict[str, Snapshot | None] = field(default_factory=dict)
    notes: list[tuple[str, PlanNote]] = field(default_factory=list)  # (appointment id, note)
    quarantined: list[SeenVersion] = field(default_factory=list)  # versions that could not be decided

    def merge(self, other: Decision) -> None:
        self.notifications += other.notifications
        self.withdrawals += other.withdrawals
        self.snapshots.update(other.snapshots)
        self.notes += other.notes
        self.quarantined += other.quarantined


def recorded(examined: Examined, decision: Decision) -> list[SeenVersion]:
    """The seen versions to record: those examined, with the reason for each one quarantined while deciding."""
    bad = {_triple(q): q for q in decision.quarantined}
    return [bad.get(_triple(s), s) for s in examined.seen]


def _triple(seen: SeenVersion) -> tuple[str, str, str]:
    return seen.resource_type, seen.resource_id, seen.version


@dataclass
class Committed:
    """What a commit recorded: the notification keys inserted and the versions quarantined."""

    inserted: list[str] = field(default_factory=list)
    quarantined: list[SeenVersion] = field(default_factory=list)

    def __iadd__(self, other: Committed) -> Committed:
        self.inserted += other.inserted
        self.quarantined += other.quarantined
        return self


def synthesized(appointment_id: str, before: Snapshot) -> dict[str, Any]:
    """A minimal Appointment from a remembered state, to announce a deletion (no PHI was kept)."""
    resource: dict[str, Any] = {
        "resourceType": "Appointment",
        "id": appointment_id,
        "status": "cancelled",
        "participant": [{"actor": {"reference": f"Patient/{p}"}, "status": "accepted"} for p in before.patients],
    }
    if before.start and before.end:
        resource["start"] = before.start.isoformat().replace("+00:00", "Z")
        resource["end"] = before.end.isoformat().replace("+00:00", "Z")
    return resource


class Planner:
    """Turns pages of a source into committed notifications."""

    def __init__(
        self,
        config: Config,
        mappings: MappingSet,
        ledger: SqlLedger,
        sources: dict[str, FhirPollSource],
        cache: ResourceCache,
        clock: Clock,
    ) -> None:
        self.config = config
        self.mappings = mappings
        self.ledger = ledger
        self.sources = sources
        self.cache = cache
        self.clock = clock
        quiet = config.quiet_hours
        self.quiet = QuietHours(quiet.start, quiet.end) if quiet else None
        # One change at a time per source in this process: a poll, a pushed notification and a deletion
        # found at send time must not decide from the same remembered state at once.
        self._busy: dict[str, asyncio.Lock] = {name: asyncio.Lock() for name in sources}
        # Between sweeps (a poll that reads the whole overlap again), a poll starts where the last one in
        # this process ended: the highest lastUpdated it saw.
        self._swept: dict[str, datetime] = {}
        self._resume: dict[str, datetime] = {}

    # -- deciding -------------------------------------------------------------------------------------

    def _situation(
        self, source: str, appointment: dict[str, Any], version: str, notified: set[tuple[str, str]]
    ) -> Situation:
        settings = self.config.sources[source]
        zone = appointment_zone(appointment, settings.location_timezones, settings.timezone)
        appointment_id = str(appointment.get("id"))
        told = frozenset(p for a, p in notified if a == appointment_id)
        return Situation(source, appointment, version, zone, self.quiet, told, self.clock())

    def _apply(
        self,
        decision: Decision,
        source: str,
        appointment: dict[str, Any],
        version: str,
        changes: list[Transition],
        notified: set[tuple[str, str]],
    ) -> None:
        situation = self._situation(source, appointment, version, notified)
        appointment_id = str(appointment.get("id"))
        for change in changes:
            if change.withdraw:
                decision.withdrawals.append(
                    Withdrawal(appointment_id, change.patients, f"withdrawn: the appointment became {change.event}")
                )
            result = plan(self.mappings, change, situation)
            decision.notifications += result.notifications
            for note in result.notes:
                decision.notes.append((appointment_id, note))
                if note.problem:
                    log.error(
                        "mapping.failed",
                        mapping=note.mapping,
                        source=source,
                        resource=fhir.describe(appointment),
                        problem=note.message,
                    )

    def decide(
        self, source: str, valid: list[Seen], before: dict[str, Snapshot], notified: set[tuple[str, str]]
    ) -> Decision:
        """Pure given its inputs: diff each version against the remembered state and plan the changes. A
        version that cannot be decided, or whose result the ledger could not store, is quarantined alone."""
        decision = Decision()
        states = dict(before)
        for item in valid:
            appointment_id = str(item.resource["id"])
            part = Decision()
            try:
                after = snapshot(item.resource, item.version, item.last_updated, self.config.sources[source].base_url)
                if is_stale(states.get(appointment_id), after):
                    continue
                changes = transitions(states.get(appointment_id), after)
                self._apply(part, source, item.resource, item.version, changes, notified)
                check_storable(part.notifications, after.patients)
            except Exception as exc:  # noqa: BLE001 - one version is quarantined, whatever went wrong
                decision.quarantined.append(
                    SeenVersion(*seen_key(item.resource), item.last_updated, reason(exc, "planning"))
                )
                continue
            states[appointment_id] = after
            part.snapshots[appointment_id] = after
            decision.merge(part)
        return decision

    async def decide_page(self, source: str, examined: Examined, first_sight: bool) -> Decision:
        """`decide` with the remembered states and who was told, read from the ledger (none at first sight)."""
        ids = [str(item.resource["id"]) for item in examined.valid]
        before = {} if first_sight else await asyncio.to_thread(self.ledger.snapshots, source, ids)
        notified = await asyncio.to_thread(self.ledger.notified, source, ids) if ids else set()
        return self.decide(source, examined.valid, before, notified)

    # -- recording ------------------------------------------------------------------------------------

    async def _commit(self, name: str, examined: Examined, decision: Decision, cursor: datetime | None) -> Committed:
        """Record a page in one transaction. Should the ledger refuse it for its data (not an outage), each
        version is recorded on its own and the one refused is quarantined; the cursor moves last."""
        seen = recorded(examined, decision)
        try:
            inserted = await asyncio.to_thread(
                self.ledger.record_page,
                name,
                decision.notifications,
                seen,
                cursor,
                decision.snapshots,
                decision.withdrawals,
            )
        except Exception as exc:
            if unavailable(exc):
                raise
            log.error("page.refused", source=name, problem=where(exc), action="recording each version alone")
            return await self._commit_each(name, examined, seen, cursor)
        quarantined = [s for s in seen if s.problem]
        self._report(name, quarantined)
        return Committed(inserted, quarantined)

    async def _commit_each(
        self, name: str, examined: Examined, seen: list[SeenVersion], cursor: datetime | None
    ) -> Committed:
        done = Committed()
        quarantined = {_triple(s): s for s in seen if s.problem}
        for item in examined.valid:
            triple = seen_key(item.resource)
            if triple in quarantined:
                continue
            single = Examined(valid=[item], seen=[s for s in seen if _triple(s) == triple])
            try:
                decision = await self.decide_page(name, single, first_sight=False)
                rows = recorded(single, decision)
                done.inserted += await asyncio.to_thread(
                    self.ledger.record_page,
                    name,
                    decision.notifications,
                    rows,
                    None,
                    decision.snapshots,
                    decision.withdrawals,
                )
                quarantined.update({_triple(r): r for r in rows if r.problem})
            except Exception as exc:
                if unavailable(exc):
                    raise
                quarantined[triple] = SeenVersion(*triple, item.last_updated, reason(exc, "recording"))
        done.quarantined = list(quarantined.values())
        await asyncio.to_thread(self.ledger.record_page, name, [], done.quarantined, cursor)
        self._report(name, done.quarantined)
        return done

    def _report(self, name: str, quarantined: list[SeenVersion]) -> None:
        """Each quarantined version is logged and counted once: when it is recorded (a version already
        recorded is not read again, see ledger.new_versions)."""
        for row in quarantined:
            log.error(
                "resource.quarantined",
                source=name,
                resource=f"{row.resource_type}/{row.resource_id}",
                version=row.version,
                problem=row.problem,
            )
            metrics.inc("connector_quarantined_total", source=name)

    # -- polling --------------------------------------------------------------------------------------

    def remember(self, source: str, page: fhir.SearchPage) -> None:
        for resource in [*page.matches, *page.included.values()]:
            if isinstance(resource, dict) and resource.get("id"):
                self.cache.put(source, resource)

    async def poll(self, name: str, sweep: bool = False) -> PollReport:
        """One incremental poll of source `name`, unless another replica is polling it right now. `sweep`:
        read the whole overlap again now (after a Subscription reported a gap, say)."""
        lock = await asyncio.to_thread(self.ledger.try_lock_source, name)
        if lock is False:
            log.debug("poll.skipped", source=name, problem="another replica is polling this source")
            return PollReport(name, skipped=True)
        try:
            strategy = self.sources[name].config.strategy
            poll = {"last-updated": self._poll, "history": self._poll_history, "date-window": self._poll_window}
            async with self._busy[name]:
                if sweep:
                    self._swept.pop(name, None)
                return await poll[strategy](name)
        except SourceError as exc:
            log.error("poll.failed", source=name, problem=str(exc))
            metrics.inc("connector_poll_failures_total", source=name)
            return PollReport(name, error=str(exc))
        finally:
            await asyncio.to_thread(self.ledger.unlock_source, lock)

    async def _start(self, name: str) -> tuple[datetime | None, datetime, datetime | None]:
        """The cursor, where this poll reads from, and when it began if it is a sweep (else None). A sweep
        reads from the cursor minus `overlap` (late commits); it is due every `sweep`, and it is the first poll
        of a process. The polls in between read from where the last one ended. A first poll remembers its
        starting point."""
        source = self.sources[name]
        cursor = await asyncio.to_thread(self.ledger.cursor, name)
        since = self.since(name, cursor)
        if cursor is None:
            # So that what changes before the first appointment arrives is not skipped by the next poll
            # starting from "now" again.
            cursor = since + source.config.overlap
            await asyncio.to_thread(self.ledger.record_page, name, [], [], cursor)
        # Due when the next poll would come after `sweep` has passed since the last sweep began (half an
        # interval of slack, so that `sweep` <= `interval` makes every poll a sweep).
        now, swept, resume = self.clock(), self._swept.get(name), self._resume.get(name)
        settings = source.config
        if swept is not None and resume is not None and abs(now - swept) < settings.sweep - settings.interval / 2:
            return cursor, max(since, resume), None
        return cursor, since, now

    def _done(self, name: str, sweep: datetime | None, since: datetime, newest: datetime | None) -> None:
        """A poll read everything from `since` on: the next one may start from the newest it saw. `sweep`:
        when this poll began, if it was a sweep."""
        self._resume[name] = max(since, newest) if newest is not None else since
        if sweep is not None:
            self._swept[name] = sweep

    async def ingest(self, name: str, resources: list[Any]) -> Committed:
        """Appointments that arrived otherwise than by a poll (a subscription, a re-read): diffed, planned
        and committed like a page; versions already seen are skipped. Returns the keys inserted and the
        versions quarantined."""
        async with self._busy[name]:
            return await self._ingest(name, resources)

    async def _ingest(self, name: str, resources: list[Any]) -> Committed:
        page = fhir.SearchPage(matches=list(resources))
        fresh = await asyncio.to_thread(self.ledger.new_versions, name, triples(page))
        examined = examine(page, fresh, self.config.sources[name].base_url)
        decision = await self.decide_page(name, examined, first_sight=False)
        committed = await self._commit(name, examined, decision, None)
        self.remember(name, page)
        return committed

    async def _poll_history(self, name: str) -> PollReport:
        """`_history?_since=`: every version since the cursor, newest per appointment kept (several updates
        between two polls are one change), DELETE entries planned as deletions."""
        source = self.sources[name]
        report = PollReport(name)
        cursor, since, sweep = await self._start(name)
        entries: list[dict[str, Any]] = []
        highest: datetime | None = None  # the newest lastUpdated this poll saw
        async for page in source.history_pages(since):
            report.pages += 1
            for raw in page.matches:
                updated = fhir.last_updated(raw)
                if updated is not None:
                    highest = later(highest, self._bounded(name, updated))
                entries.append(raw)
        latest = newest_per_id(entries)
        report.resources = len(latest)
        versions = [raw for raw in latest.values() if not raw.get("_deleted")]
        committed = await self._ingest(name, versions)
        for appointment_id, raw in latest.items():
            if raw.get("_deleted"):
                committed += await self._deleted(name, appointment_id)
        newest = later(cursor, highest)
        if newest is not None and newest != cursor:
            await asyncio.to_thread(self.ledger.record_page, name, [], [], newest)
        self._done(name, sweep, since, highest)
        report.inserted, report.quarantined = len(committed.inserted), len(committed.quarantined)
        log.info(
            "poll.done",
            source=name,
            strategy="history",
            sweep=sweep is not None,
            pages=report.pages,
            appointments=report.resources,
            quarantined=report.quarantined,
            notifications=report.inserted,
        )
        return report

    async def _poll_window(self, name: str) -> PollReport:
        """Appointments starting in the window, diffed against what is remembered; a booked one that
        vanished from the window is read by id: gone means deleted, found means it changed."""
        source = self.sources[name]
        report = PollReport(name)
        now = self.clock()
        start, end = now - source.config.window.past, now + source.config.window.future
        found: dict[str, dict[str, Any]] = {}
        async for page in source.window_pages(start, end):
            report.pages += 1
            self.remember(name, page)
            for raw in page.matches:
                if isinstance(raw, dict) and raw.get("id"):
                    found[str(raw["id"])] = raw
        report.resources = len(found)
        committed = await self._ingest(name, list(found.values()))
        remembered = await asyncio.to_thread(self.ledger.window_snapshots, name, start, end)
        for appointment_id in sorted(set(remembered) - set(found)):
            current = await source.read("Appointment", appointment_id)
            if current is None:
                committed += await self._deleted(name, appointment_id)
            else:
                committed += await self._ingest(name, [current])
        report.inserted, report.quarantined = len(committed.inserted), len(committed.quarantined)
        log.info(
            "poll.done",
            source=name,
            strategy="date-window",
            pages=report.pages,
            appointments=report.resources,
            vanished=len(set(remembered) - set(found)),
            quarantined=report.quarantined,
            notifications=report.inserted,
        )
        return report

    async def _poll(self, name: str) -> PollReport:
        """`_lastUpdated` search. Source errors end the poll; its cursor stays put."""
        source = self.sources[name]
        report = PollReport(name)
        cursor, since, sweep = await self._start(name)
        highest: datetime | None = None  # the newest lastUpdated this poll saw
        honours_sort: bool | None = None
        try:
            async for page in source.pages(since):
                report.pages += 1
                if honours_sort is None:
                    honours_sort = self._check_self_link(name, page)
                fresh = await asyncio.to_thread(self.ledger.new_versions, name, triples(page))
                examined = examine(page, fresh, source.config.base_url)
                decision = await self.decide_page(name, examined, first_sight=False)
                if examined.newest:
                    highest = later(highest, self._bounded(name, examined.newest))
                committed = await self._commit(
                    name, examined, decision, later(cursor, highest) if honours_sort else None
                )
                self.remember(name, page)
                report.resources += len(page.matches)
                report.new_versions += len(examined.seen)
                report.quarantined += len(committed.quarantined)
                report.planned += len(decision.notifications)
                report.inserted += len(committed.inserted)
            newest = later(cursor, highest)
            if not honours_sort and newest is not None and newest != cursor:
                await asyncio.to_thread(self.ledger.record_page, name, [], [], newest)
        except SourceError as exc:
            report.error = str(exc)
            log.error("poll.failed", source=name, pages=report.pages, problem=str(exc))
            metrics.inc("connector_poll_failures_total", source=name)
            return report
        if newest is not None:
            await asyncio.to_thread(self.ledger.prune_seen, name, newest - 2 * source.config.overlap)
        self._done(name, sweep, since, highest)
        log.info(
            "poll.done",
            source=name,
            sweep=sweep is not None,
            pages=report.pages,
            resources=report.resources,
            new_versions=report.new_versions,
            quarantined=report.quarantined,
            notifications=report.inserted,
        )
        return report

    def _bounded(self, name: str, newest: datetime) -> datetime:
        """A lastUpdated in the future (a server clock ahead, a bad import) must not carry the cursor past
        changes still to come: the cursor goes no further than our wall clock plus the overlap."""
        limit = datetime.now(UTC) + self.sources[name].config.overlap
        if newest > limit:
            log.warning(
                "poll.future_timestamp",
                source=name,
                problem="a resource's meta.lastUpdated is in the future; the cursor is held at the present",
            )
            return limit - self.sources[name].config.overlap
        return newest

    def since(self, name: str, cursor: datetime | None) -> datetime:
        settings = self.sources[name].config
        if cursor is not None:
            return cursor - settings.overlap
        return self.clock() if settings.start_from == "now" else settings.start_from

    def _check_self_link(self, name: str, page: fhir.SearchPage) -> bool:
        """The self link lists the parameters the server used. Without `_lastUpdated`, every poll would read
        every appointment: fail loudly (default) or, with on_ignored_filter: scan, go on."""
        used = parse_qs(urlsplit(page.self_url or "").query)
        if "_lastUpdated" not in used:
            if self.sources[name].config.on_ignored_filter == "fail":
                raise SourceError(
                    f"source {name!r}: the server ignored _lastUpdated (its self link does not "
                    "list it); use strategy: history or date-window, or on_ignored_filter: scan"
                )
            log.warning(
                "poll.filter_ignored",
                source=name,
                problem="the server ignored _lastUpdated; every poll reads every appointment (seen "
                "versions are still skipped)",
            )
        return any(value.lower() == "_lastupdated" for value in used.get("_sort", []))

    async def deleted(self, name: str, appointment_id: str) -> Committed:
        """The source says this appointment is gone: withdraw what is pending and plan what a deletion
        means (a cancellation, if the patient was told about the appointment)."""
        async with self._busy[name]:
            return await self._deleted(name, appointment_id)

    async def _deleted(self, name: str, appointment_id: str) -> Committed:
        version = "deleted"
        try:
            if not fhir.FHIR_ID.fullmatch(appointment_id):
                raise ResourceError("a deletion names an Appointment by an id that is not a FHIR id")
            before = (await asyncio.to_thread(self.ledger.snapshots, name, [appointment_id])).get(appointment_id)
            if before is None:  # never seen, or its deletion was handled already
                return Committed()
            # The version names the deletion, so no cached copy of the last version passes for the current one.
            version = f"deleted-after-{before.version}"[:128]
            notified = await asyncio.to_thread(self.ledger.notified, name, [appointment_id])
            decision = Decision(snapshots={appointment_id: None})
            self._apply(
                decision, name, synthesized(appointment_id, before), version, transitions(before, None), notified
            )
            check_storable(decision.notifications)
            inserted = await asyncio.to_thread(
                self.ledger.record_page,
                name,
                decision.notifications,
                [],
                None,
                decision.snapshots,
                decision.withdrawals,
            )
        except Exception as exc:
            if unavailable(exc):
                raise
            row = SeenVersion("Appointment", safe_text(appointment_id, 128), version, None, reason(exc, "deletion"))
            first = await asyncio.to_thread(self.ledger.new_versions, name, [_triple(row)])
            await asyncio.to_thread(self.ledger.record_page, name, [], [row], None)
            self._report(name, [row] if first else [])
            return Committed(quarantined=[row])
        log.info(
            "appointment.deleted",
            source=name,
            resource=f"Appointment/{appointment_id}",
            notifications=len(decision.notifications),
        )
        return Committed(inserted)
