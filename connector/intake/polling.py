"""Polling a source: the three ways to find changed appointments, and the cursor they move.

    last-updated  `_lastUpdated` search from the poll's window (connector.intake.cursor); the cursor moves
                  after every page when the server honoured `_sort=_lastUpdated`, otherwise once every page
                  of the poll is committed
    history       `_history?_since=`: every version since the window's start, newest per appointment kept
                  (several updates between two polls are one change), DELETE entries planned as deletions
    date-window   appointments starting in the configured window, diffed against what is remembered; a
                  booked one that vanished from the window is read by id: gone means deleted

Each page goes through the planner (examine → decide → commit). A source error ends the poll and its
cursor stays where the last committed page left it; another replica holding the source's poll lock makes
this one skip.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import structlog

from connector import fhir, metrics
from connector.errors import SourceError
from connector.intake.cursor import PollWindow, Progress, in_future, since
from connector.intake.decide import newest_per_id
from connector.results import PollReport

if TYPE_CHECKING:
    from connector.intake.planner import Planner
    from connector.ledger.abc import Intake
    from connector.models import Clock
    from connector.sources.fhir_poll import FhirPollSource

log = structlog.get_logger("connector.pipeline")


class Poller:
    def __init__(self, planner: Planner, intake: Intake, sources: dict[str, FhirPollSource], clock: Clock) -> None:
        self.planner = planner
        self.intake = intake
        self.sources = sources
        self.clock = clock
        self.progress: dict[str, Progress] = {name: Progress() for name in sources}

    async def poll(self, name: str, sweep: bool = False) -> PollReport:
        """One incremental poll of source `name`, unless another replica is polling it right now. `sweep`:
        read the whole overlap again now (after a Subscription reported a gap, say)."""
        lock = await self.intake.try_lock_source(name)
        if lock is False:
            log.debug("poll.skipped", source=name, problem="another replica is polling this source")
            return PollReport(name, skipped=True)
        try:
            strategy = self.sources[name].config.strategy
            poll = {"last-updated": self._last_updated, "history": self._history, "date-window": self._window}
            async with self.planner.busy(name):
                if sweep:
                    self.progress[name] = self.progress[name].sweep_next()
                return await poll[strategy](name)
        except SourceError as exc:
            log.error("poll.failed", source=name, problem=str(exc))
            metrics.inc("connector_poll_failures_total", source=name)
            return PollReport(name, error=str(exc))
        finally:
            await self.intake.unlock_source(lock)

    def since(self, name: str, cursor: datetime | None) -> datetime:
        """Where a sweep of `name` would read from (see connector.intake.cursor.since)."""
        return since(cursor, self.sources[name].config, self.clock())

    async def _start(self, name: str) -> PollWindow:
        """The window of this poll. A first poll ever records its starting point (plus the overlap) as the
        cursor, so that what changes before the first appointment arrives is not skipped by the next poll
        starting from "now" again."""
        settings = self.sources[name].config
        cursor = await self.intake.cursor(name)
        start = self.since(name, cursor)
        if cursor is None:
            cursor = start + settings.overlap
            await self.intake.record_page(name, [], [], cursor)
        return self.progress[name].start(cursor, start, self.clock(), settings)

    def _saw(self, name: str, window: PollWindow, updated: datetime) -> PollWindow:
        overlap, wall = self.sources[name].config.overlap, datetime.now(UTC)
        if in_future(updated, overlap, wall):
            log.warning(
                "poll.future_timestamp",
                source=name,
                problem="a resource's meta.lastUpdated is in the future; the cursor is held at the present",
            )
        return window.saw(updated, overlap, wall)

    async def _last_updated(self, name: str) -> PollReport:
        """`_lastUpdated` search. Source errors end the poll; its cursor stays put."""
        source = self.sources[name]
        report = PollReport(name)
        window = await self._start(name)
        honours_sort: bool | None = None
        try:
            async for page in source.pages(window.since):
                report.pages += 1
                if honours_sort is None:
                    honours_sort = self._check_self_link(name, page)
                examined = await self.planner.examine(name, page)
                decision = await self.planner.decide(name, examined, first_sight=False)
                if examined.newest:
                    window = self._saw(name, window, examined.newest)
                committed = await self.planner.commit(name, examined, decision, window.newest if honours_sort else None)
                self.planner.remember(name, page)
                report.resources += len(page.matches)
                report.new_versions += len(examined.seen)
                report.quarantined += len(committed.quarantined)
                report.planned += len(decision.notifications)
                report.inserted += len(committed.inserted)
            if not honours_sort and window.newest != window.cursor:
                await self.intake.record_page(name, [], [], window.newest)
        except SourceError as exc:
            report.error = str(exc)
            log.error("poll.failed", source=name, pages=report.pages, problem=str(exc))
            metrics.inc("connector_poll_failures_total", source=name)
            return report
        await self.intake.prune_seen(name, window.newest - 2 * source.config.overlap)
        self.progress[name] = self.progress[name].done(window)
        log.info(
            "poll.done",
            source=name,
            sweep=window.sweep is not None,
            pages=report.pages,
            resources=report.resources,
            new_versions=report.new_versions,
            quarantined=report.quarantined,
            notifications=report.inserted,
        )
        return report

    async def _history(self, name: str) -> PollReport:
        """`_history?_since=`: every version since the window's start, newest per appointment kept, DELETE
        entries planned as deletions."""
        source = self.sources[name]
        report = PollReport(name)
        window = await self._start(name)
        entries: list[dict[str, Any]] = []
        async for page in source.history_pages(window.since):
            report.pages += 1
            for raw in page.matches:
                updated = fhir.last_updated(raw)
                if updated is not None:
                    window = self._saw(name, window, updated)
                entries.append(raw)
        latest = newest_per_id(entries)
        report.resources = len(latest)
        versions = [raw for raw in latest.values() if not raw.get("_deleted")]
        committed = await self.planner.ingest_locked(name, versions)
        for appointment_id, raw in latest.items():
            if raw.get("_deleted"):
                committed += await self.planner.deleted_locked(name, appointment_id)
        if window.newest != window.cursor:
            await self.intake.record_page(name, [], [], window.newest)
        self.progress[name] = self.progress[name].done(window)
        report.inserted, report.quarantined = len(committed.inserted), len(committed.quarantined)
        log.info(
            "poll.done",
            source=name,
            strategy="history",
            sweep=window.sweep is not None,
            pages=report.pages,
            appointments=report.resources,
            quarantined=report.quarantined,
            notifications=report.inserted,
        )
        return report

    async def _window(self, name: str) -> PollReport:
        """Appointments starting in the window, diffed against what is remembered; a booked one that
        vanished from the window is read by id: gone means deleted, found means it changed."""
        source = self.sources[name]
        report = PollReport(name)
        now = self.clock()
        start, end = now - source.config.window.past, now + source.config.window.future
        found: dict[str, dict[str, Any]] = {}
        async for page in source.window_pages(start, end):
            report.pages += 1
            self.planner.remember(name, page)
            for raw in page.matches:
                if isinstance(raw, dict) and raw.get("id"):
                    found[str(raw["id"])] = raw
        report.resources = len(found)
        committed = await self.planner.ingest_locked(name, list(found.values()))
        remembered = await self.intake.window_snapshots(name, start, end)
        for appointment_id in sorted(set(remembered) - set(found)):
            current = await source.read("Appointment", appointment_id)
            if current is None:
                committed += await self.planner.deleted_locked(name, appointment_id)
            else:
                committed += await self.planner.ingest_locked(name, [current])
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
