"""Where notifications leave: claim the due ones, read what they need, render, send, record.

For each claimed notification: read the Appointment and Patient (from the poller's cache when it holds
the planned version, else from the source: `_id` searches for a batch, single reads as the fallback), pick
the address, render, commit `sending`, send, and record the outcome. Only the commit of `sending` comes
before the request; a crash after it leaves the notification `in_doubt`, never resent. A crash while
preparing (before `sending`) spends an attempt and ends `failed` once the retry policy gives up.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from connector import fhir, metrics
from connector.cache import ResourceCache
from connector.config import Config
from connector.crm.processor import CrmProcessor, NotSendable, NotYet
from connector.delivery import BulkMailer, Mailer, Outcome, Signal, Verdict
from connector.delivery.gate import GateState, MailerGate
from connector.delivery.retry import GiveUp, RetryAt, RetryPolicy, next_try
from connector.errors import SourceError
from connector.health import MailerFacts, mailer_facts
from connector.ledger import NotificationRecord, SendResult
from connector.ledger.batching import Coalesced
from connector.ledger.sql import SqlLedger, unavailable
from connector.lifecycle import CANCELLED, NOSHOW, appointment_zone, still_wanted
from connector.logs import where
from connector.mapping.engine import RenderError, render
from connector.mapping.loader import MappingSet
from connector.models import Clock, Email, State
from connector.pipeline import synthesized
from connector.recipients import NoRecipient, optout_lookup, prefetch, read_cached, resolve
from connector.results import DispatchReport, Step
from connector.sources.fhir_poll import FhirPollSource

log = structlog.get_logger("connector.dispatch")
MAX_PUT_BACK = 10_000  # a run that put back this many stops claiming (a source down with a large backlog)


@dataclass(frozen=True)
class Prepared:
    notification: NotificationRecord
    email: Email


class Dispatcher:
    def __init__(
        self,
        config: Config,
        mappings: MappingSet,
        ledger: SqlLedger,
        sources: dict[str, FhirPollSource],
        mailer: Mailer,
        cache: ResourceCache,
        clock: Clock,
        owner: str,
        on_deleted: Callable[[str, str], Awaitable[object]],
    ) -> None:
        self.config = config
        self.mappings = mappings
        self.ledger = ledger
        self.sources = sources
        self.mailer = mailer
        self.cache = cache
        self.clock = clock
        self.owner = owner
        self.on_deleted = on_deleted
        self.crm: CrmProcessor | None = None
        self.stopping = False
        self._paused: str | None = None
        # For health: a configuration error blocks sending until an answer shows the mailer works again.
        self.blocked: str | None = None
        self.blocked_since: datetime | None = None
        self.gate_since: datetime | None = None
        settings = config.dispatch
        self.gate = MailerGate(
            failure_threshold=settings.circuit_failures,
            cooldown=settings.circuit_cooldown,
            pause=settings.rate_limit_pause,
        )
        self.policy = RetryPolicy(
            max_attempts=settings.max_attempts,
            max_age=settings.max_age,
            base=settings.retry_backoff,
            cap=settings.retry_backoff_max,
        )
        # Concurrent sends share their ledger transactions (group commit, see connector.ledger.batching).
        self._start_many = Coalesced(self._start_sending)
        self._finish_many = Coalesced(self._finish)
        self._opted_out = optout_lookup(ledger)

    async def run(self) -> DispatchReport:
        """Send everything due now until nothing due is left, the mailer gate stays closed or we are stopping.

        Claimed notifications are split into groups (`bulk` per bulk request, else one each) and up to
        `concurrency` groups are prepared and sent at once; the next batch is claimed while the last groups
        are still out, so one slow request holds one slot and nothing else."""
        report = DispatchReport()
        self._paused = None
        interrupted = await asyncio.to_thread(self.ledger.mark_interrupted, datetime.now(UTC), False)
        if interrupted:
            log.warning("dispatch.in_doubt", count=interrupted, problem="sends interrupted by a stop or crash")
        settings = self.config.dispatch
        size = settings.bulk if settings.bulk > 1 and isinstance(self.mailer, BulkMailer) else 1
        queue: deque[list[NotificationRecord]] = deque()
        running: set[asyncio.Task[list[tuple[int, Step]]]] = set()
        put_back: set[int] = set()  # released or retried in this run: not claimed again before the next
        drained = False
        try:
            while not self.stopping and self._paused is None:
                if not self.gate.ready(self.clock()):
                    if running:
                        put_back |= await self._collect(running, report)
                    elif not await self._wait_for_gate():
                        break
                    continue
                while not drained and len(queue) < settings.concurrency and len(put_back) <= MAX_PUT_BACK:
                    batch = await self._claim(put_back)
                    drained = not batch
                    queue.extend(batch[i : i + size] for i in range(0, len(batch), size))
                while queue and len(running) < settings.concurrency:
                    running.add(asyncio.create_task(self._group(queue.popleft())))
                if not running:
                    break
                put_back |= await self._collect(running, report)
                drained = False  # what just finished may have planned more (a cancellation for a deleted visit)
        finally:
            while running:
                await self._collect(running, report)
            if queue:
                await asyncio.to_thread(self.ledger.release, self.owner, [n.id for group in queue for n in group])
        report.paused = self._paused
        if self.gate.state is not GateState.RUNNING:
            report.waiting = f"mailer {self.gate.state.value} until {self.gate.until}"
        if any(report.steps.values()):
            log.info("dispatch.done", **{str(k): v for k, v in report.steps.items() if v})
        return report

    async def _claim(self, put_back: set[int]) -> list[NotificationRecord]:
        """The next due notifications, without those put back earlier in this run (a source that could not
        be read, a quick retry): they wait for the next run and do not hold up the others."""
        settings, wall = self.config.dispatch, datetime.now(UTC)
        batch = await asyncio.to_thread(
            self.ledger.claim_due,
            self.clock(),
            settings.batch_size,
            self.owner,
            wall + settings.lease,
            wall,
            sorted(put_back),
        )
        try:
            await prefetch(self.cache, self.sources, batch)
        except Exception as exc:  # noqa: BLE001 - best effort: each notification reads what is missing
            log.warning("dispatch.prefetch_failed", problem=where(exc))
        return batch

    async def _collect(self, running: set[asyncio.Task[list[tuple[int, Step]]]], report: DispatchReport) -> set[int]:
        """Count the steps of the groups that finished; returns the notifications they put back (released,
        or due again after a retry). Those waiting for the mailer are not among them: they may go in this
        run once the gate opens."""
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        put_back: set[int] = set()
        for task in done:
            running.discard(task)
            for notification_id, step in task.result():
                report.steps[step] += 1
                if step in (Step.RELEASED, Step.RETRY):
                    put_back.add(notification_id)
        return put_back

    async def _wait_for_gate(self) -> bool:
        """The gate is closed. When it opens within one dispatch interval, wait here (a 429 with
        Retry-After: 1 costs a second, not a whole interval); else leave it to the next run."""
        until = self.gate.until
        if until is None:
            return False
        wait = (until - self.clock()).total_seconds()
        if wait > self.config.dispatch.interval.total_seconds():
            return False
        deadline = asyncio.get_running_loop().time() + max(wait, 0.0)
        while not self.stopping and asyncio.get_running_loop().time() < deadline:  # a stop does not wait
            await asyncio.sleep(min(0.2, deadline - asyncio.get_running_loop().time()))
        return not self.stopping and self.gate.ready(self.clock())

    async def _group(self, notifications: list[NotificationRecord]) -> list[tuple[int, Step]]:
        """Prepare a group, then send what is ready: in one bulk request, or one by one. An unexpected
        error leaves the group as it is (pending, or sending → in_doubt after its lease)."""
        try:
            prepared = await self._guarded(notifications, [self.prepare(n) for n in notifications])
            ready = [p for p in prepared if isinstance(p, Prepared)]
            if len(ready) > 1:
                sent = iter(await self._send_bulk(ready))
            else:
                sent = iter([await self._send_one(p) for p in ready])
            return [
                (n.id, next(sent) if isinstance(p, Prepared) else p)
                for n, p in zip(notifications, prepared, strict=True)
            ]
        except Exception as exc:  # noqa: BLE001 - logged; the other groups go on
            log.error("dispatch.crashed", notifications=[n.id for n in notifications], problem=where(exc))
            self.gate.give_back()  # it may have held the probe: the gate must not stay closed for ever
            return [(n.id, Step.RELEASED) for n in notifications]

    async def _guarded(self, batch: list[NotificationRecord], work: list[Awaitable[Any]]) -> list[Any]:
        """Run the preparations concurrently; one that crashes is retried later, a bounded number of times
        (see `_crashed`), and disturbs nothing else."""
        results = await asyncio.gather(*work, return_exceptions=True)
        for index, (notification, result) in enumerate(zip(batch, results, strict=True)):
            if isinstance(result, Exception):
                results[index] = await self._crashed(notification, result)
            elif isinstance(result, BaseException):
                raise result
        return results

    async def _crashed(self, n: NotificationRecord, exc: Exception) -> Step:
        """A preparation crashed (a bug, or data nothing refused earlier). It counts as an attempt against
        `dispatch.max_attempts` and `max_age`, like a send that certainly did not leave: tried again after
        the backoff, then `failed` with the place of the error. A ledger outage counts nothing."""
        problem = where(exc)
        log.error("dispatch.crashed", notification=n.id, problem=problem)
        if unavailable(exc):
            return await self._release(n)
        now, reason = self.clock(), f"preparation failed: {problem}"
        decision = next_try(
            self.policy,
            attempts=n.attempts + 1,
            first_attempt_at=n.first_attempt_at or now,
            now=now,
            reason=reason,
            retry_after=None,
        )
        if isinstance(decision, RetryAt):
            await asyncio.to_thread(self.ledger.prepare_failed, n.id, self.owner, reason, decision.due)
            return Step.RETRY
        reason = decision.reason
        await asyncio.to_thread(self.ledger.prepare_failed, n.id, self.owner, reason, None)
        log.error(
            "notification.failed",
            notification=n.id,
            mapping=n.mapping,
            resource=f"{n.resource_type}/{n.resource_id}",
            reason=reason,
        )
        return Step.FAILED

    async def release(self) -> None:
        """Give back every lease this process holds on pending notifications (graceful stop)."""
        await asyncio.to_thread(self.ledger.release, self.owner)

    async def _may_send(self, notifications: list[NotificationRecord]) -> bool:
        if self.stopping or self._paused is not None or not self.gate.allow(self.clock()):
            await asyncio.to_thread(self.ledger.release, self.owner, [n.id for n in notifications])
            return False
        return True

    def _start_sending(self, ids: list[int]) -> list[bool]:
        started = self.ledger.start_sending(ids, self.owner, datetime.now(UTC) + self.config.dispatch.lease)
        return [i in started for i in ids]

    def _finish(self, results: list[SendResult]) -> list[None]:
        self.ledger.finish(results)
        return [None] * len(results)

    async def _send_one(self, prepared: Prepared) -> Step:
        n = prepared.notification
        if not await self._may_send([n]):
            return Step.WAITING
        if not (await self._start_many([n.id]))[0]:
            self.gate.give_back()
            return Step.RELEASED
        started = time.monotonic()
        outcome = await self.mailer.send(prepared.email)
        metrics.observe("connector_send_duration_seconds", time.monotonic() - started)
        return await self._record(n, outcome)

    async def _send_bulk(self, chunk: list[Prepared]) -> list[Step]:
        """One bulk request for the chunk; the steps in the chunk's order."""
        if not await self._may_send([p.notification for p in chunk]):
            return [Step.WAITING] * len(chunk)
        flags = await self._start_many([p.notification.id for p in chunk])
        started = [p for p, ok in zip(chunk, flags, strict=True) if ok]
        if not started:
            self.gate.give_back()
            return [Step.RELEASED] * len(chunk)
        assert isinstance(self.mailer, BulkMailer)
        began = time.monotonic()
        outcomes = await self.mailer.send_many([p.email for p in started])
        metrics.observe("connector_send_duration_seconds", time.monotonic() - began)
        recorded = iter(
            await asyncio.gather(
                *(
                    self._record(p.notification, outcome, note_gate=p is started[-1])
                    for p, outcome in zip(started, outcomes, strict=True)
                )
            )
        )
        return [next(recorded) if ok else Step.RELEASED for ok in flags]

    async def prepare(self, n: NotificationRecord) -> Prepared | Step:
        """Read, check, choose the address and render; settle the notification when it cannot be sent."""
        mapping = self.mappings.get(n.mapping)
        if mapping is None:
            return await self._settle(n, State.CANCELLED, f"mapping {n.mapping!r} no longer exists")
        if n.resource_type == "CrmEvent":
            if self.crm is None:
                log.error("dispatch.no_source", notification=n.id, source=n.source)
                return await self._release(n)
            email = await self.crm.prepare(n, mapping, self.clock())
            if isinstance(email, NotYet):
                log.warning("dispatch.read_failed", notification=n.id, problem=email.reason)
                return await self._release(n)
            if isinstance(email, NotSendable):
                return await self._settle(n, email.state, email.reason)
            return Prepared(n, email)
        source = self.sources.get(n.source)
        if source is None:
            log.error("dispatch.no_source", notification=n.id, source=n.source)
            return await self._release(n)
        if not fhir.FHIR_ID.fullmatch(n.resource_id) or (n.patient_id and not fhir.FHIR_ID.fullmatch(n.patient_id)):
            return await self._settle(
                n,
                State.FAILED,
                "the notification names its Appointment or Patient by an id "
                "that is not a FHIR id (planned by an earlier version)",
            )
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
            recipient = await resolve(
                n.patient_id,
                source=source,
                cache=self.cache,
                opted_out=self._opted_out,
                consent=source.config.consent,
                now=now,
            )
        except SourceError as exc:
            log.warning("dispatch.read_failed", notification=n.id, problem=str(exc))
            return await self._release(n)
        if isinstance(recipient, NoRecipient):
            return await self._settle(n, recipient.state, recipient.reason)
        settings = source.config
        try:
            email = render(
                mapping,
                key=n.key,
                to=recipient.address,
                appointment=appointment,
                patient=recipient.patient,
                event=n.event,
                source=n.source,
                timezone=appointment_zone(appointment, settings.location_timezones, settings.timezone),
                locale=self.config.locale,
                languages=fhir.preferred_languages(recipient.patient),
                now=now,
                default_from=self.config.delivery.from_address,
                default_reply_to=self.config.delivery.reply_to,
            )
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
        log.warning(
            f"notification.{state.value}",
            notification=n.id,
            mapping=n.mapping,
            resource=f"{n.resource_type}/{n.resource_id}",
            reason=reason,
        )
        return Step(state.value)

    async def _release(self, n: NotificationRecord) -> Step:
        await asyncio.to_thread(self.ledger.release, self.owner, [n.id])
        return Step.RELEASED

    def _note_gate(self, outcome: Outcome) -> None:
        change = self.gate.record(outcome, self.clock())
        if change is not None:
            self.gate_since = datetime.now(UTC)
            metrics.inc("connector_mailer_state_changes_total", state=change.value)
            if change is GateState.RUNNING:
                log.info("mailer.recovered")
            else:
                log.error(f"mailer.{change.value}", until=str(self.gate.until), reason=outcome.reason)

    def _note_blocked(self, outcome: Outcome) -> None:
        if outcome.blocking and self.blocked is None:
            self.blocked, self.blocked_since = outcome.reason, datetime.now(UTC)
        elif not outcome.blocking and outcome.signal is Signal.OK and self.blocked is not None:
            self.blocked = self.blocked_since = None
            log.info("mailer.recovered", problem="the mailer accepts this configuration again")

    def mailer_state(self) -> MailerFacts:
        return mailer_facts(self.gate, self.blocked, self.blocked_since, self.gate_since)

    async def _record(self, n: NotificationRecord, outcome: Outcome, note_gate: bool = True) -> Step:
        fields = {"notification": n.id, "mapping": n.mapping, "resource": f"{n.resource_type}/{n.resource_id}"}
        now = self.clock()
        if note_gate:
            self._note_gate(outcome)
        self._note_blocked(outcome)
        step = await self._store(n, outcome, now, fields)
        metrics.inc("connector_notifications_total", state=step.value)
        return step

    async def _store(self, n: NotificationRecord, outcome: Outcome, now: datetime, fields: dict[str, Any]) -> Step:
        if outcome.verdict is Verdict.SENT:
            await self._finish_many([SendResult(n.id, State.SENT, tracking_id=outcome.tracking_id, when=now)])
            log.info("notification.sent", **fields)
            return Step.SENT
        if outcome.verdict is Verdict.FAILED:
            await self._finish_many([SendResult(n.id, State.FAILED, outcome.reason)])
            log.error("notification.failed", **fields, reason=outcome.reason)
            return Step.FAILED
        if outcome.verdict is Verdict.IN_DOUBT:
            await self._finish_many([SendResult(n.id, State.IN_DOUBT, outcome.reason)])
            log.error("notification.in_doubt", **fields, reason=outcome.reason)
            return Step.IN_DOUBT
        if outcome.blocking or outcome.signal is Signal.RATE_LIMITED:
            # Not this notification's fault: it waits for the mailer, without spending an attempt.
            await self._finish_many([SendResult(n.id, State.PENDING, outcome.reason, due_at=now, count_attempt=False)])
            if outcome.blocking and self._paused is None:
                self._paused = outcome.reason
                log.error("mailer.paused", reason=outcome.reason)
            return Step.WAITING
        decision = next_try(
            self.policy,
            attempts=n.attempts + 1,
            first_attempt_at=n.first_attempt_at or now,
            now=now,
            reason=outcome.reason,
            retry_after=outcome.retry_after,
        )
        if isinstance(decision, GiveUp):
            await self._finish_many([SendResult(n.id, State.FAILED, decision.reason)])
            log.error("notification.failed", **fields, reason=decision.reason)
            return Step.FAILED
        await self._finish_many([SendResult(n.id, State.PENDING, outcome.reason, due_at=decision.due)])
        log.warning(
            "notification.retry", **fields, reason=outcome.reason, delay_s=round((decision.due - now).total_seconds())
        )
        return Step.RETRY
