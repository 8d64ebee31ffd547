"""Where notifications leave: claim the due ones, read what they need, render, send, record.

For each claimed notification: read the Appointment and Patient (from the poller's cache when it holds
the planned version, else from the source), pick the address, render, commit `sending`, send, and
record the outcome. Only the commit of `sending` comes before the request; a crash after it leaves the
notification `in_doubt`, never resent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import structlog

from connector import fhir
from connector.cache import ResourceCache
from connector.config import Config
from connector.delivery import Mailer, Outcome, Verdict
from connector.delivery.retry import backoff
from connector.errors import SourceError
from connector.ledger import NotificationRecord
from connector.ledger.sql import SqlLedger
from connector.lifecycle import CANCELLED, NOSHOW, appointment_zone, still_wanted
from connector.logs import where
from connector.mapping.engine import RenderError, render
from connector.mapping.loader import MappingSet
from connector.models import Clock, Email, State
from connector.pipeline import synthesized
from connector.recipients import NoRecipient, read_cached, resolve
from connector.sources.fhir_poll import FhirPollSource

log = structlog.get_logger("connector.dispatch")

LEASE = timedelta(minutes=5)


class Step(StrEnum):
    SENT = "sent"
    FAILED = "failed"
    IN_DOUBT = "in_doubt"
    RETRY = "retry"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    RELEASED = "released"  # put back untouched (source unreachable, mailer paused, lease lost)


@dataclass
class DispatchReport:
    steps: dict[Step, int] = field(default_factory=lambda: dict.fromkeys(Step, 0))
    paused: str | None = None

    @property
    def sent(self) -> int:
        return self.steps[Step.SENT]


@dataclass(frozen=True)
class Prepared:
    notification: NotificationRecord
    email: Email


class Dispatcher:
    def __init__(self, config: Config, mappings: MappingSet, ledger: SqlLedger,
                 sources: dict[str, FhirPollSource], mailer: Mailer, cache: ResourceCache, clock: Clock,
                 owner: str, on_deleted: Callable[[str, str], Awaitable[object]]) -> None:
        self.config = config
        self.mappings = mappings
        self.ledger = ledger
        self.sources = sources
        self.mailer = mailer
        self.cache = cache
        self.clock = clock
        self.owner = owner
        self.on_deleted = on_deleted
        self.stopping = False
        self._paused: str | None = None

    async def run(self) -> DispatchReport:
        """Send everything due now, batch after batch, until nothing due is left or we are stopping."""
        report = DispatchReport()
        self._paused = None
        interrupted = await asyncio.to_thread(self.ledger.mark_interrupted, datetime.now(UTC), False)
        if interrupted:
            log.warning("dispatch.in_doubt", count=interrupted, problem="sends interrupted by a stop or crash")
        settings = self.config.dispatch
        limit = asyncio.Semaphore(settings.concurrency)
        while not self.stopping and self._paused is None:
            wall = datetime.now(UTC)
            batch = await asyncio.to_thread(self.ledger.claim_due, self.clock(), settings.batch_size, self.owner,
                                            wall + LEASE, wall)
            if not batch:
                break

            async def one(notification: NotificationRecord) -> Step:
                async with limit:
                    if self.stopping or self._paused is not None:
                        await asyncio.to_thread(self.ledger.release, self.owner, [notification.id])
                        return Step.RELEASED
                    return await self._deliver(notification)

            outcomes = await asyncio.gather(*(one(n) for n in batch), return_exceptions=True)
            steps: list[Step] = []
            for notification, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    # A bug or a database failure: the notification keeps its state (pending, or sending →
                    # in_doubt after its lease); the rest of the batch was not disturbed.
                    log.error("dispatch.crashed", notification=notification.id, problem=where(outcome))
                    outcome = Step.RELEASED
                steps.append(outcome)
                report.steps[outcome] += 1
            if all(step is Step.RELEASED for step in steps):
                break
        report.paused = self._paused
        if any(report.steps.values()):
            log.info("dispatch.done", **{str(k): v for k, v in report.steps.items() if v})
        return report

    async def release(self) -> None:
        """Give back every lease this process holds on pending notifications (graceful stop)."""
        await asyncio.to_thread(self.ledger.release, self.owner)

    async def _deliver(self, notification: NotificationRecord) -> Step:
        prepared = await self.prepare(notification)
        if isinstance(prepared, Step):
            return prepared
        if self.stopping:
            return await self._release(notification)
        lease_until = datetime.now(UTC) + LEASE
        if not await asyncio.to_thread(self.ledger.start_sending, notification.id, self.owner, lease_until):
            return Step.RELEASED
        outcome = await self.mailer.send(prepared.email)
        return await self._record(notification, outcome)

    async def prepare(self, n: NotificationRecord) -> Prepared | Step:
        """Read, check, choose the address and render; settle the notification when it cannot be sent."""
        mapping = self.mappings.get(n.mapping)
        if mapping is None:
            return await self._settle(n, State.CANCELLED, f"mapping {n.mapping!r} no longer exists")
        source = self.sources.get(n.source)
        if source is None:
            log.error("dispatch.no_source", notification=n.id, source=n.source)
            return await self._release(n)
        now = self.clock()
        try:
            appointment = await read_cached(self.cache, source, "Appointment", n.resource_id, n.resource_version)
            if appointment is None:
                appointment = await self._gone(n)
                if appointment is None:
                    return Step.CANCELLED
            stale = still_wanted(n.event, mapping.spec.is_reminder, n.appointment_start, appointment, now)
            if stale is not None:
                return await self._settle(n, State.CANCELLED, stale)
            recipient = await resolve(n.patient_id, source=source, cache=self.cache, ledger=self.ledger,
                                      consent=source.config.consent, now=now)
        except SourceError as exc:
            log.warning("dispatch.read_failed", notification=n.id, problem=str(exc))
            return await self._release(n)
        if isinstance(recipient, NoRecipient):
            return await self._settle(n, recipient.state, recipient.reason)
        settings = source.config
        try:
            email = render(mapping, key=n.key, to=recipient.address, appointment=appointment,
                           patient=recipient.patient, event=n.event, source=n.source,
                           timezone=appointment_zone(appointment, settings.location_timezones, settings.timezone),
                           locale=self.config.locale, languages=fhir.preferred_languages(recipient.patient),
                           now=now, default_from=self.config.delivery.from_address,
                           default_reply_to=self.config.delivery.reply_to)
        except RenderError as exc:
            return await self._settle(n, State.FAILED, str(exc))
        return Prepared(n, email)

    async def _gone(self, n: NotificationRecord) -> dict[str, Any] | None:
        """The source no longer has the appointment. A cancellation is rendered from the remembered state;
        anything else is withdrawn, and the deletion is planned like any other change."""
        if n.event in (CANCELLED, NOSHOW):
            before = await asyncio.to_thread(self.ledger.snapshot, n.source, n.resource_id)
            if before is not None:
                return synthesized(n.resource_id, before)
        await self.on_deleted(n.source, n.resource_id)
        await self._settle(n, State.CANCELLED, f"Appointment/{n.resource_id} was deleted on source {n.source!r}")
        return None

    async def _settle(self, n: NotificationRecord, state: State, reason: str) -> Step:
        await asyncio.to_thread(self.ledger.settle, n.id, self.owner, state, reason)
        log.warning(f"notification.{state.value}", notification=n.id, mapping=n.mapping,
                    resource=f"{n.resource_type}/{n.resource_id}", reason=reason)
        return Step(state.value)

    async def _release(self, n: NotificationRecord) -> Step:
        await asyncio.to_thread(self.ledger.release, self.owner, [n.id])
        return Step.RELEASED

    async def _record(self, n: NotificationRecord, outcome: Outcome) -> Step:
        fields = {"notification": n.id, "mapping": n.mapping, "resource": f"{n.resource_type}/{n.resource_id}"}
        now = self.clock()
        if outcome.verdict is Verdict.SENT:
            await asyncio.to_thread(self.ledger.finish, n.id, State.SENT, None, outcome.tracking_id, now)
            log.info("notification.sent", **fields)
            return Step.SENT
        if outcome.verdict is Verdict.FAILED:
            await asyncio.to_thread(self.ledger.finish, n.id, State.FAILED, outcome.reason, None, now)
            log.error("notification.failed", **fields, reason=outcome.reason)
            return Step.FAILED
        if outcome.verdict is Verdict.IN_DOUBT:
            await asyncio.to_thread(self.ledger.finish, n.id, State.IN_DOUBT, outcome.reason, None, now)
            log.error("notification.in_doubt", **fields, reason=outcome.reason)
            return Step.IN_DOUBT
        settings = self.config.dispatch
        attempts = n.attempts + 1
        if outcome.blocking:
            await asyncio.to_thread(self.ledger.retry_later, n.id, now, outcome.reason, False)
            if self._paused is None:
                self._paused = outcome.reason
                log.error("mailer.paused", reason=outcome.reason)
            return Step.RELEASED
        if attempts >= settings.max_attempts:
            reason = f"gave up after {attempts} attempts: {outcome.reason}"
            await asyncio.to_thread(self.ledger.finish, n.id, State.FAILED, reason, None, now)
            log.error("notification.failed", **fields, reason=reason)
            return Step.FAILED
        delay = backoff(attempts, settings.retry_backoff, settings.retry_backoff_max, outcome.retry_after)
        await asyncio.to_thread(self.ledger.retry_later, n.id, now + delay, outcome.reason, True)
        log.warning("notification.retry", **fields, reason=outcome.reason, delay_s=round(delay.total_seconds()))
        return Step.RETRY
