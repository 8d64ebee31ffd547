"""Where events enter and are decided: poll a source page by page, plan, and commit to the ledger.

For each page: validate the Appointments, drop the (id, version) pairs already seen, plan notifications
with the mappings, then commit notifications + seen versions + cursor in one transaction. The cursor is
the highest `meta.lastUpdated` seen (server time, never ours); it moves after every page when the server
honoured `_sort=_lastUpdated`, otherwise only once every page of the poll is committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from connector import fhir
from connector.cache import ResourceCache
from connector.config import Config
from connector.errors import ResourceError, SourceError
from connector.ledger import NotificationRecord, SeenVersion
from connector.ledger.sql import SqlLedger
from connector.lifecycle import appointment_events
from connector.mapping.engine import plan
from connector.mapping.loader import MappingSet
from connector.models import AppointmentEvent, Clock, PlannedNotification
from connector.sources.fhir_poll import FhirPollSource

log = structlog.get_logger("connector.pipeline")


@dataclass
class Examined:
    """What a page holds, after validation: events to plan, versions to remember, problems."""

    events: list[AppointmentEvent] = field(default_factory=list)
    seen: list[SeenVersion] = field(default_factory=list)
    newest: datetime | None = None


def examine(source: str, page: fhir.SearchPage, fresh: set[tuple[str, str, str]] | None) -> Examined:
    """Pure: validate a page's matches. `fresh` limits events to versions not seen before (None = all)."""
    result = Examined()
    for raw in page.matches:
        updated = fhir.last_updated(raw) if isinstance(raw, dict) else None
        if updated is not None and (result.newest is None or updated > result.newest):
            result.newest = updated
        if not isinstance(raw, dict) or not raw.get("id"):
            log.error("resource.invalid", source=source, problem="entry without resource id")
            continue
        triple = (str(raw.get("resourceType")), str(raw["id"]), fhir.version_of(raw))
        if fresh is not None and triple not in fresh:
            continue
        problem = None
        try:
            if triple[0] != "Appointment":
                raise ResourceError(f"{fhir.describe(raw)} is not an Appointment")
            fhir.validate(raw)
        except ResourceError as exc:
            problem = str(exc)
            log.error("resource.invalid", source=source, resource=fhir.describe(raw), problem=problem)
        result.seen.append(SeenVersion(*triple, last_updated=updated, problem=problem))
        if problem is None:
            result.events += [AppointmentEvent(source, event, raw, triple[2]) for event in appointment_events(raw)]
    return result


def triples(page: fhir.SearchPage) -> list[tuple[str, str, str]]:
    return [(str(r.get("resourceType")), str(r["id"]), fhir.version_of(r))
            for r in page.matches if isinstance(r, dict) and r.get("id")]


@dataclass
class PollReport:
    source: str
    pages: int = 0
    resources: int = 0
    new_versions: int = 0
    planned: int = 0
    inserted: int = 0
    invalid: int = 0
    error: str | None = None


@dataclass
class ReplayItem:
    notification: PlannedNotification
    existing: NotificationRecord | None
    inserted: bool


class Planner:
    """Turns pages of a source into committed notifications."""

    def __init__(self, config: Config, mappings: MappingSet, ledger: SqlLedger,
                 sources: dict[str, FhirPollSource], cache: ResourceCache, clock: Clock) -> None:
        self.config = config
        self.mappings = mappings
        self.ledger = ledger
        self.sources = sources
        self.cache = cache
        self.clock = clock

    def _plan_all(self, events: Iterable[AppointmentEvent]) -> list[PlannedNotification]:
        now = self.clock()
        planned: list[PlannedNotification] = []
        for event in events:
            result = plan(self.mappings, event, now)
            for problem in result.problems:
                log.error("mapping.failed", mapping=problem.mapping, source=event.source,
                          resource=fhir.describe(event.resource), problem=problem.message)
            planned += result.notifications
        return planned

    def _remember(self, source: str, page: fhir.SearchPage) -> None:
        for resource in [*page.matches, *page.included.values()]:
            if isinstance(resource, dict) and resource.get("id"):
                self.cache.put(source, resource)

    async def poll(self, name: str) -> PollReport:
        """One incremental poll of source `name`. Source errors end the poll; its cursor stays put."""
        source = self.sources[name]
        report = PollReport(name)
        cursor = await asyncio.to_thread(self.ledger.cursor, name)
        start_from = source.config.start_from
        since = cursor - source.config.overlap if cursor else (self.clock() if start_from == "now" else start_from)
        newest: datetime | None = cursor
        honours_sort: bool | None = None
        try:
            async for page in source.pages(since):
                report.pages += 1
                if honours_sort is None:
                    honours_sort = self._check_self_link(name, page)
                fresh = await asyncio.to_thread(self.ledger.new_versions, name, triples(page))
                examined = examine(name, page, fresh)
                planned = self._plan_all(examined.events)
                if examined.newest and (newest is None or examined.newest > newest):
                    newest = examined.newest
                inserted = await asyncio.to_thread(self.ledger.record_page, name, planned, examined.seen,
                                                   newest if honours_sort else None)
                self._remember(name, page)
                report.resources += len(page.matches)
                report.new_versions += len(examined.seen)
                report.invalid += sum(1 for s in examined.seen if s.problem)
                report.planned += len(planned)
                report.inserted += len(inserted)
            if not honours_sort and newest is not None and newest != cursor:
                await asyncio.to_thread(self.ledger.record_page, name, [], [], newest)
        except SourceError as exc:
            report.error = str(exc)
            log.error("poll.failed", source=name, pages=report.pages, problem=str(exc))
            return report
        if newest is not None:
            await asyncio.to_thread(self.ledger.prune_seen, name, newest - 2 * source.config.overlap)
        log.info("poll.done", source=name, pages=report.pages, resources=report.resources,
                 new_versions=report.new_versions, invalid=report.invalid, notifications=report.inserted)
        return report

    def _check_self_link(self, name: str, page: fhir.SearchPage) -> bool:
        used = page.self_url or ""
        if "_lastUpdated" not in used:
            log.warning("poll.filter_ignored", source=name,
                        problem="the server did not report using _lastUpdated; every poll reads every "
                                "appointment (seen versions are still skipped)")
        return "_sort=_lastUpdated" in used or "_sort=_lastupdated" in used.lower()

    async def replay(self, name: str, pages: AsyncIterator[fhir.SearchPage] | Iterable[fhir.SearchPage],
                     dry_run: bool) -> list[ReplayItem]:
        """Plan every version in `pages` again, whether seen or not; the ledger's keys keep already
        recorded notifications from being added twice. The cursor is not touched."""
        items: list[ReplayItem] = []
        keys: set[str] = set()
        async for page in _aiter(pages):
            examined = examine(name, page, None)
            planned = []
            for notification in self._plan_all(examined.events):  # several versions may plan one key
                if notification.key not in keys:
                    keys.add(notification.key)
                    planned.append(notification)
            existing = await asyncio.to_thread(self.ledger.existing, [p.key for p in planned])
            inserted: set[str] = set()
            if not dry_run:
                inserted = set(await asyncio.to_thread(self.ledger.add, planned))
                self._remember(name, page)
            items += [ReplayItem(p, existing.get(p.key), p.key in inserted) for p in planned]
        return items


async def _aiter(pages: AsyncIterator[Any] | Iterable[Any]) -> AsyncIterator[Any]:
    if hasattr(pages, "__aiter__"):
        async for page in pages:
            yield page
    else:
        for page in pages:
            yield page
