"""Where notifications leave: claim the due ones, prepare them, send, record.

For each claimed notification: the preparer of its kind (connector.sending.appointment, .crm; chosen by
resource type) reads what it needs, checks it is still wanted, picks the address and renders; the
dispatcher commits `sending`, sends, and records the outcome (connector.sending.steps). Only the commit of
`sending` comes before the request; a crash after it leaves the notification `in_doubt`, never resent. A
crash while preparing (before `sending`) spends an attempt and ends `failed` once the retry policy gives up.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from connector import metrics
from connector.cap import Deferred, Skipped
from connector.delivery import BulkMailer, Mailer, Outcome, Signal, Verdict
from connector.delivery.gate import GateState, MailerGate
from connector.delivery.retry import RetryPolicy
from connector.health import MailerFacts, mailer_facts
from connector.ledger.batching import Coalesced
from connector.ledger.engine import unavailable
from connector.logs import where
from connector.models import Clock, Email, State
from connector.results import DispatchReport, Step
from connector.sending.preparer import Deletions, Gone, NoSource, NotSendable, NotYet, Preparer
from connector.sending.steps import after_crash, recording

if TYPE_CHECKING:
    from connector.config import Config
    from connector.ledger import NotificationRecord, SendResult
    from connector.ledger.abc import Outbox
    from connector.mapping.loader import MappingSet
    from connector.sending.cap import DailyCap

log = structlog.get_logger("connector.dispatch")
MAX_PUT_BACK = 10_000  # a run that put back this many stops claiming (a source down with a large backlog)


@dataclass(frozen=True)
class Ready:
    """A notification prepared: its email may be sent."""

    notification: NotificationRecord
    email: Email


class Dispatcher:
    def __init__(
        self,
        config: Config,
        mappings: MappingSet,
        outbox: Outbox,
        preparers: Mapping[str, Preparer],
        deletions: Deletions,
        mailer: Mailer,
        clock: Clock,
        owner: str,
        cap: DailyCap | None = None,
    ) -> None:
        self.config = config
        self.mappings = mappings
        self.outbox = outbox
        self.preparers = preparers  # by resource type: "Appointment", "CrmEvent"
        self.deletions = deletions
        self.mailer = mailer
        self.clock = clock
        self.owner = owner
        self.cap = cap  # limits.per_patient_per_day
        # Told of each email Paubox accepted or may have (write-back keeps its subject and text in memory).
        self.accepted: Callable[[NotificationRecord, Email], None] | None = None
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

    async def run(self) -> DispatchReport:
        """Send everything due now until nothing due is left, the mailer gate stays closed or we are stopping.

        Claimed notifications are split into groups (`bulk` per bulk request, else one each) and up to
        `concurrency` groups are prepared and sent at once; the next batch is claimed while the last groups
        are still out, so one slow request holds one slot and nothing else."""
        report = DispatchReport()
        self._paused = None
        interrupted = await self.outbox.mark_interrupted(datetime.now(UTC), False)
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
                await self.outbox.release(self.owner, [n.id for group in queue for n in group])
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
        batch = await self.outbox.claim_due(
            self.clock(),
            settings.batch_size,
            self.owner,
            wall + settings.lease,
            wall,
            sorted(put_back),
        )
        try:
            for preparer in self.preparers.values():
                await preparer.read_ahead(batch)
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
                if step in (Step.RELEASED, Step.RETRY, Step.DEFERRED):
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
            ready = [p for p in prepared if isinstance(p, Ready)]
            if len(ready) > 1:
                sent = iter(await self._send_bulk(ready))
            else:
                sent = iter([await self._send_one(p) for p in ready])
            return [
                (n.id, next(sent) if isinstance(p, Ready) else p) for n, p in zip(notifications, prepared, strict=True)
            ]
        except Exception as exc:  # noqa: BLE001 - logged; the other groups go on
            log.error("dispatch.crashed", notifications=[n.id for n in notifications], problem=where(exc))
            self.gate.give_back()  # it may have held the probe: the gate must not stay closed for ever
            return [(n.id, Step.RELEASED) for n in notifications]
        finally:
            if self.cap is not None:
                self.cap.done(notifications)

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
        crash = after_crash(n, problem, self.policy, self.clock())
        await self.outbox.prepare_failed(n.id, self.owner, crash.reason, crash.due)
        if crash.step is Step.FAILED:
            log.error(
                "notification.failed",
                notification=n.id,
                mapping=n.mapping,
                resource=f"{n.resource_type}/{n.resource_id}",
                reason=crash.reason,
            )
        return crash.step

    async def release(self) -> None:
        """Give back every lease this process holds on pending notifications (graceful stop)."""
        await self.outbox.release(self.owner)

    async def _may_send(self, notifications: list[NotificationRecord]) -> bool:
        if self.stopping or self._paused is not None or not self.gate.allow(self.clock()):
            await self.outbox.release(self.owner, [n.id for n in notifications])
            return False
        return True

    async def _start_sending(self, ids: list[int]) -> list[bool]:
        started = await self.outbox.start_sending(ids, self.owner, datetime.now(UTC) + self.config.dispatch.lease)
        return [i in started for i in ids]

    async def _finish(self, results: list[SendResult]) -> list[None]:
        await self.outbox.finish(results)
        return [None] * len(results)

    async def _send_one(self, prepared: Ready) -> Step:
        n = prepared.notification
        if not await self._may_send([n]):
            return Step.WAITING
        if not (await self._start_many([n.id]))[0]:
            self.gate.give_back()
            return Step.RELEASED
        started = time.monotonic()
        outcome = await self.mailer.send(prepared.email)
        metrics.observe("connector_send_duration_seconds", time.monotonic() - started)
        self._tell(prepared, outcome)
        return await self._record(n, outcome)

    async def _send_bulk(self, chunk: list[Ready]) -> list[Step]:
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
        for p, outcome in zip(started, outcomes, strict=True):
            self._tell(p, outcome)
        recorded = iter(
            await asyncio.gather(
                *(
                    self._record(p.notification, outcome, note_gate=p is started[-1])
                    for p, outcome in zip(started, outcomes, strict=True)
                )
            )
        )
        return [next(recorded) if ok else Step.RELEASED for ok in flags]

    def _tell(self, prepared: Ready, outcome: Outcome) -> None:
        if self.accepted is not None and outcome.verdict in (Verdict.SENT, Verdict.IN_DOUBT):
            self.accepted(prepared.notification, prepared.email)

    async def prepare(self, n: NotificationRecord) -> Ready | Step:
        """Prepare with the preparer of its kind; settle the notification when it cannot be sent, put it back
        when it cannot be prepared now."""
        mapping = self.mappings.get(n.mapping)
        if mapping is None:
            return await self._settle(n, State.CANCELLED, f"mapping {n.mapping!r} no longer exists")
        preparer = self.preparers.get(n.resource_type)
        prepared = await preparer.prepare(n, mapping, self.clock()) if preparer is not None else NoSource(n.source)
        if isinstance(prepared, NoSource):
            log.error("dispatch.no_source", notification=n.id, source=n.source)
            return await self._release(n)
        if isinstance(prepared, NotYet):
            log.warning("dispatch.read_failed", notification=n.id, problem=prepared.reason)
            return await self._release(n)
        if isinstance(prepared, NotSendable):
            return await self._settle(n, prepared.state, prepared.reason)
        if isinstance(prepared, Gone):
            # Intake plans what the deletion means first (its withdrawals, a cancellation): see preparer.py.
            await self.deletions.deleted(prepared.source, prepared.resource_id)
            reason = f"Appointment/{prepared.resource_id} was deleted on source {prepared.source!r}"
            return await self._settle(n, State.CANCELLED, reason)
        if self.cap is not None:  # the daily cap (limits.per_patient_per_day)
            verdict = await self.cap.check(n, self.clock())
            if isinstance(verdict, Skipped):
                return await self._settle(n, State.SKIPPED, verdict.reason)
            if isinstance(verdict, Deferred):
                await self.cap.store.defer(n.id, self.owner, verdict.due, verdict.reason)
                log.warning("notification.deferred", notification=n.id, mapping=n.mapping, reason=verdict.reason)
                return Step.DEFERRED
        return Ready(n, prepared)

    async def _settle(self, n: NotificationRecord, state: State, reason: str) -> Step:
        await self.outbox.settle(n.id, self.owner, state, reason)
        log.warning(
            f"notification.{state.value}",
            notification=n.id,
            mapping=n.mapping,
            resource=f"{n.resource_type}/{n.resource_id}",
            reason=reason,
        )
        return Step(state.value)

    async def _release(self, n: NotificationRecord) -> Step:
        await self.outbox.release(self.owner, [n.id])
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
        now = self.clock()
        if note_gate:
            self._note_gate(outcome)
        self._note_blocked(outcome)
        done = recording(n, outcome, self.policy, now)
        await self._finish_many([done.result])
        if done.event is not None:
            fields = {"notification": n.id, "mapping": n.mapping, "resource": f"{n.resource_type}/{n.resource_id}"}
            getattr(log, done.level)(done.event, **fields, **dict(done.fields))
        if done.pause is not None and self._paused is None:
            self._paused = done.pause
            log.error("mailer.paused", reason=done.pause)
        metrics.inc("connector_notifications_total", state=done.step.value)
        return done.step
