"""The daemon's view of its own health, behind `/healthz` and `/metrics` (connector.web.health), and the rows
`connector status` reads.

    findings()     readiness: every part well or not, since when and why (connector.health decides)
    exposition()   Prometheus text: the counters and histograms of connector.metrics, and gauges computed at
                   scrape time from the ledger and from this process

Polls and dispatch runs report here (`polled`, `dispatched`); what they report is kept in memory and
written to the ledger (best effort: an unreachable ledger must not hide the failure it causes). Ledger
reads for `/healthz` and `/metrics` run on a thread of their own, one at a time, reused for a second, and
are given up after `health.ledger_timeout`: the event loop never waits for the database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy.exc import SQLAlchemyError

from connector import health
from connector.health import MAILER_STATES, Finding, MailerFacts, SourceFacts
from connector.ledger.health import LedgerGauges, SqlHealth, describe, probe_engine
from connector.logs import where

if TYPE_CHECKING:
    from connector.config import Config
    from connector.ledger.abc import Health
    from connector.metrics import Metrics

log = structlog.get_logger("connector.monitor")
T = TypeVar("T")


def wall() -> datetime:
    return datetime.now(UTC)


class Fresh(Generic[T]):
    """A blocking read on a thread of its own: one at a time, its result reused for `max_age` seconds,
    given up (not cancelled: the thread finishes on its own) after `timeout` seconds."""

    def __init__(self, read: Callable[[], T], executor: ThreadPoolExecutor, max_age: float, timeout: float) -> None:
        self.read, self.executor, self.max_age, self.timeout = read, executor, max_age, timeout
        self._value: tuple[float, T] | None = None
        self._running: asyncio.Future[T] | None = None

    async def get(self) -> T:
        if self._value is not None and time.monotonic() - self._value[0] < self.max_age:
            return self._value[1]
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().run_in_executor(self.executor, self._timed)
            self._running.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, not lost
        return await asyncio.wait_for(asyncio.shield(self._running), self.timeout)

    def _timed(self) -> T:
        value = self.read()
        self._value = (time.monotonic(), value)
        return value


class Monitor:
    def __init__(self, config: Config, store: Health, metrics: Metrics, mailer: Callable[[], MailerFacts]) -> None:
        self.config = config
        self.settings = config.health
        self.started = wall()
        self.store = store  # writes, over the daemon's engine
        self.mailer = mailer
        self.metrics = metrics
        self.sources: dict[str, SourceFacts] = {name: SourceFacts() for name in config.sources}
        self._written_mailer: MailerFacts | None = None
        self._ledger_failing_since: datetime | None = None
        timeout = self.settings.ledger_timeout.total_seconds()
        self._probe = probe_engine(config.ledger_url, timeout)
        reader = SqlHealth(self._probe)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="connector-health")
        self._rows = Fresh(reader.sources, self._executor, max_age=1.0, timeout=timeout)
        self._gauges = Fresh(lambda: reader.gauges(wall()), self._executor, max_age=1.0, timeout=timeout)
        self.gauges = Gauges(self)
        metrics.registry.register(self.gauges)

    # -- what the daemon reports -----------------------------------------------------------------------

    async def polled(self, source: str, error: str | None, seconds: float) -> None:
        """A poll of `source` ended (not one skipped because another replica polls it)."""
        now = wall()
        self.metrics.observe("connector_poll_duration_seconds", seconds, source=source)
        facts = self.sources.get(source, SourceFacts())
        self.sources[source] = facts.failed(now, error) if error is not None else facts.completed(now)
        write = self.store.poll_completed if error is None else self.store.poll_failed
        args = (source, now) if error is None else (source, now, error)
        await self._write(write, *args)

    async def dispatched(self) -> None:
        """A dispatch run ended: write the mailer's state to the ledger when it changed."""
        facts = self.mailer()
        if self._written_mailer is not None and (facts.state, facts.reason) == (
            self._written_mailer.state,
            self._written_mailer.reason,
        ):
            return
        if await self._write(self.store.mailer_changed, facts, wall()):
            self._written_mailer = facts

    async def _write(self, write: Callable[..., Awaitable[None]], *args: Any) -> bool:
        try:
            await write(*args)
            return True
        except SQLAlchemyError as exc:
            log.warning("health.not_recorded", problem=describe(exc))
            return False

    # -- what it answers ------------------------------------------------------------------------------

    async def findings(self) -> list[Finding]:
        now = wall()
        problem: str | None = None
        try:
            rows = await self._rows.get()
        except (SQLAlchemyError, TimeoutError, OSError) as exc:
            rows, problem = {}, f"the ledger cannot be read: {describe(exc)}"
        if problem is None and self._ledger_failing_since is not None:
            self._ledger_failing_since = None
            log.info("health.ledger_reachable")
        elif problem is not None and self._ledger_failing_since is None:
            self._ledger_failing_since = now
            log.error("health.ledger_unreachable", problem=problem)
        findings = [health.ledger_finding(problem, self._ledger_failing_since)]
        for name, source in self.config.sources.items():
            facts = self.sources.get(name, SourceFacts()).merged(rows.get(name, SourceFacts()))
            findings.append(health.source_finding(name, facts, source.interval, self.settings, now, self.started))
        findings.append(health.mailer_finding(self.mailer()))
        return findings

    async def exposition(self) -> bytes:
        """The text of `/metrics`, with the gauges gathered just before (off the event loop)."""
        self.gauges.findings = await self.findings()
        try:
            self.gauges.ledger = await self._gauges.get()
        except (SQLAlchemyError, TimeoutError, OSError) as exc:
            log.debug("metrics.ledger_unreadable", problem=describe(exc))
            self.gauges.ledger = None
        return self.metrics.exposition()

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._probe.dispose()


class Gauges:
    """The gauges of `/metrics`, from the facts the endpoint gathered just before (off the event loop)."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.findings: list[Finding] = []
        self.ledger: LedgerGauges | None = None

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration; names are unique by construction

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception as exc:  # noqa: BLE001 - a scrape must still show the counters
            log.error("metrics.gauges_failed", problem=where(exc))

    def _collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily("connector_ready", "1 when /healthz answers 200, else 0.")
        ready.add_metric([], float(bool(self.findings) and all(f.ok for f in self.findings)))
        yield ready
        up = GaugeMetricFamily(
            "connector_component_up", "1 when a part is well (as /healthz judges), else 0.", labels=["component"]
        )
        for finding in self.findings:
            up.add_metric([finding.component], float(finding.ok))
        yield up
        state = self.monitor.mailer().state
        mailer = GaugeMetricFamily(
            "connector_mailer_state", "The mailer's state: 1 for the current one.", labels=["state"]
        )
        for name in MAILER_STATES:
            mailer.add_metric([name], float(name == state))
        yield mailer
        polled = GaugeMetricFamily(
            "connector_last_successful_poll_timestamp_seconds",
            "When a poll of the source last completed (any replica), Unix time.",
            labels=["source"],
        )
        for finding in self.findings:
            last = finding.details.get("last_success") if finding.component.startswith("source:") else None
            if isinstance(last, datetime):
                polled.add_metric([finding.component.split(":", 1)[1]], last.timestamp())
        yield polled
        yield from self._ledger()

    def _ledger(self) -> Iterator[Metric]:
        ledger = self.ledger
        if ledger is None:
            return
        states = GaugeMetricFamily(
            "connector_ledger_notifications", "Notifications in the ledger, by state.", labels=["state"]
        )
        for name, count in ledger.states.items():
            states.add_metric([name], count)
        yield states
        yield GaugeMetricFamily(
            "connector_in_doubt_notifications",
            "Notifications in doubt: a person decides with `connector resolve`.",
            value=ledger.states.get("in_doubt", 0),
        )
        yield GaugeMetricFamily(
            "connector_oldest_due_pending_seconds",
            "How long the oldest due pending notification has waited (0: none waits).",
            value=ledger.oldest_due_pending,
        )
        quarantined = GaugeMetricFamily(
            "connector_quarantined_resources",
            "Resource versions set aside as unprocessable, by source.",
            labels=["source"],
        )
        for source in sorted({*self.monitor.config.sources, *ledger.quarantined}):
            quarantined.add_metric([source], ledger.quarantined.get(source, 0))
        yield quarantined
        owed = GaugeMetricFamily(
            "connector_write_backs",
            "Writes to the EHR and hand-offs not done: pending (being tried) or refused (a person must look).",
            labels=["kind", "state"],
        )
        for (kind, state), count in sorted(ledger.write_backs.items()):
            owed.add_metric([kind, state], count)
        yield owed
