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

A last-updated sweep re-reads the whole overlap: thousands of appointments, seconds of work. A Subscription's
ping must not wait for it, so the polls of one source in one process share the replica's poll lock, and a
sweep holds the planner's lock of the source (`Planner.busy`) one page at a time, not for its whole run: a
quick poll (from where the last one ended) runs beside it, one page of each at a time. Exactly once still
holds page by page: each page is examined, decided and committed under that lock, so a version read by both
is recorded by the first and skipped by the second (seen versions); each poll moves the cursor only as far
as what it read itself, and the cursor never moves back. One sweep and one quick poll at a time per source.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import structlog

from connector import fhir, metrics
from connector.errors import SourceError
from connector.intake.cursor import PollWindow, Progress, in_future, since
from connector.intake.decide import newest_per_id
from connector.logs import where
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
        self._replica: dict[str, asyncio.Lock] = {name: asyncio.Lock() for name in sources}
        self._held: dict[str, tuple[object, int]] = {}  # the replica's poll lock, shared by this process's polls
        self._quick: dict[str, asyncio.Lock] = {name: asyncio.Lock() for name in sources}
        self._sweeping: dict[str, asyncio.Lock] = {name: asyncio.Lock() for name in sources}
        self._beside: dict[str, asyncio.Task[None]] = {}  # a sweep a quick poll set off
        self._again: set[str] = set()  # a sweep was asked for while one ran beside: one more after it

    async def poll(self, name: str, sweep: bool = False, quick: bool = False) -> PollReport:
        """One poll of source `name`, unless another replica is polling it right now. `sweep`: read the whole
        overlap again now (after a Subscription reported a gap, say). `quick` (a Subscription's ping): read
        from where the last poll ended; a sweep asked for or due then runs beside it, in a task of its own
        (last-updated; the other strategies poll as before)."""
        if not await self._hold(name):
            log.debug("poll.skipped", source=name, problem="another replica is polling this source")
            return PollReport(name, skipped=True)
        try:
            strategy = self.sources[name].config.strategy
            if strategy == "last-updated":
                return await self._last_updated(name, sweep, quick)
            async with self.planner.busy(name):
                if sweep:
                    self.progress[name] = self.progress[name].sweep_next()
                return await (self._history if strategy == "history" else self._window)(name)
        except SourceError as exc:
            log.error("poll.failed", source=name, problem=str(exc))
            metrics.inc("connector_poll_failures_total", source=name)
            return PollReport(name, error=str(exc))
        finally:
            await self._release(name)

    async def aclose(self) -> None:
        """Stop the sweeps running beside quick polls (what they committed stays; the next sweep reads the
        rest)."""
        tasks = [task for task in self._beside.values() if not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def settled(self, name: str) -> None:
        """Wait for the sweep running beside quick polls of `name`, if any."""
        while (task := self._beside.get(name)) is not None and not task.done():
            await asyncio.shield(task)

    # -- who polls: the replica's lock, one sweep and one quick poll at a time ------------------------------

    async def _hold(self, name: str) -> bool:
        """Take this source's poll lock for this replica (PostgreSQL: an advisory lock, see
        Intake.try_lock_source), or share it with a poll of this process holding it already."""
        async with self._replica[name]:
            held = self._held.get(name)
            if held is not None:
                self._held[name] = (held[0], held[1] + 1)
                return True
            handle = await self.intake.try_lock_source(name)
            if handle is False:
                return False
            self._held[name] = (handle, 1)
            return True

    async def _release(self, name: str) -> None:
        async with self._replica[name]:
            handle, count = self._held.pop(name)
            if count > 1:
                self._held[name] = (handle, count - 1)
            else:
                await self.intake.unlock_source(handle)

    async def _last_updated(self, name: str, sweep: bool, quick: bool) -> PollReport:
        """A sweep (asked for, or due) under the source's sweep lock; otherwise a quick poll, under its own. A
        quick poll that finds a sweep wanted sets it off beside itself, unless nothing has been read yet (then
        only a sweep will do, and it waits for the one running)."""
        progress = self.progress[name]
        wanted = sweep or progress.due(self.clock(), self.sources[name].config)
        if wanted and quick and progress.resume is not None:
            self._sweep_beside(name, sweep)
            wanted = False
        if not wanted:
            async with self._quick[name]:
                return await self._read(name, False)
        async with self._sweeping[name]:  # decided again once a running sweep has ended: it may be done
            return await self._read(name, True if sweep else None)

    def _sweep_beside(self, name: str, asked: bool) -> None:
        """Set off a sweep in a task of its own; one asked for while one runs is one more after it."""
        running = self._beside.get(name)
        if running is not None and not running.done():
            if asked:
                self._again.add(name)
            return
        if not asked and self._sweeping[name].locked():  # a scheduled sweep runs already
            return
        self._beside[name] = asyncio.get_running_loop().create_task(self._sweeps(name, asked))

    async def _sweeps(self, name: str, asked: bool) -> None:
        while True:
            self._again.discard(name)
            try:
                await self.poll(name, sweep=asked)
            except Exception as exc:  # noqa: BLE001 - a ledger outage: the next sweep reads it again
                log.error("poll.crashed", source=name, sweep=True, problem=where(exc))
            if name not in self._again:
                return
            asked = True

    def since(self, name: str, cursor: datetime | None) -> datetime:
        """Where a sweep of `name` would read from (see connector.intake.cursor.since)."""
        return since(cursor, self.sources[name].config, self.clock())

    async def _start(self, name: str, sweep: bool | None = None) -> PollWindow:
        """The window of this poll. A first poll ever records its starting point (plus the overlap) as the
        cursor, so that what changes before the first appointment arrives is not skipped by the next poll
        starting from "now" again."""
        settings = self.sources[name].config
        cursor = await self.intake.cursor(name)
        start = self.since(name, cursor)
        if cursor is None:
            cursor = start + settings.overlap
            await self.intake.record_page(name, [], [], cursor)
        return self.progress[name].start(cursor, start, self.clock(), settings, sweep)

    def _saw(self, name: str, window: PollWindow, updated: datetime) -> PollWindow:
        overlap, wall = self.sources[name].config.overlap, datetime.now(UTC)
        if in_future(updated, overlap, wall):
            log.warning(
                "poll.future_timestamp",
                source=name,
                problem="a resource's meta.lastUpdated is in the future; the cursor is held at the present",
            )
        return window.saw(updated, overlap, wall)

    async def _read(self, name: str, sweep: bool | None) -> PollReport:
        """`_lastUpdated` search (a sweep, a quick poll, or None: a sweep if due). Each page is examined,
        decided and committed under the planner's lock of the source. Source errors end the poll; its cursor
        stays put."""
        source = self.sources[name]
        report = PollReport(name)
        started = time.monotonic()
        window = await self._start(name, sweep)
        honours_sort: bool | None = None
        try:
            async for page in source.pages(window.since):
                report.pages += 1
                if honours_sort is None:
                    honours_sort = self._check_self_link(name, page)
                async with self.planner.busy(name):
                    examined = await self.planner.examine(name, page)
                    decision = await self.planner.decide(name, examined, first_sight=False)
                    if examined.newest:
                        window = self._saw(name, window, examined.newest)
                    cursor = window.newest if honours_sort else None
                    committed = await self.planner.commit(name, examined, decision, cursor)
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
            seconds=round(time.monotonic() - started, 3),
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
