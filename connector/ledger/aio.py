"""The ledger's async face: the one place where the daemon's event loop crosses into threads.

Each role of connector.ledger.sql is synchronous (one short transaction per call); the classes here run
each call on a worker thread (`asyncio.to_thread`, below) and implement the Protocols of
connector.ledger.abc. Nothing else in the package calls `asyncio.to_thread`.

The module is longer than 400 lines: one short class of one-line wrappers per role, kept together so that
the crossing into threads stays in one place that a reader can check at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    from connector.bounces import Tally
    from connector.health import MailerFacts
    from connector.ledger import NotificationRecord, OptOut, SeenVersion, SendResult, Withdrawal, abc
    from connector.ledger.after_send import SqlAfterSend
    from connector.ledger.bounces import SqlBounces
    from connector.ledger.caps import SqlCaps
    from connector.ledger.health import SqlHealth
    from connector.ledger.inbox import SqlInbox
    from connector.ledger.intake import SqlIntake
    from connector.ledger.journal import SqlJournal
    from connector.ledger.operator import Audit, AuditEntry, Changed, Selection, SqlOperator
    from connector.ledger.optouts import SqlOptOuts
    from connector.ledger.outbox import SqlOutbox
    from connector.ledger.patient_links import SqlPatientLinks
    from connector.ledger.reports import SqlReports
    from connector.ledger.sql import SqlLedger
    from connector.ledger.writeback import SqlWriteBacks, WriteBackJob
    from connector.lifecycle import Snapshot
    from connector.models import PlannedNotification, State

P = ParamSpec("P")
R = TypeVar("R")


async def _thread(call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run one blocking ledger call on a worker thread."""
    return await asyncio.to_thread(call, *args, **kwargs)


class AsyncIntake:
    def __init__(self, role: SqlIntake) -> None:
        self.sync = role

    async def record_page(
        self,
        source: str,
        notifications: Sequence[PlannedNotification],
        seen: Sequence[SeenVersion],
        cursor: datetime | None,
        snapshots: Mapping[str, Snapshot | None] | None = None,
        withdrawals: Sequence[Withdrawal] = (),
    ) -> list[str]:
        return await _thread(self.sync.record_page, source, notifications, seen, cursor, snapshots, withdrawals)

    async def new_versions(self, source: str, versions: Sequence[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
        return await _thread(self.sync.new_versions, source, versions)

    async def cursor(self, source: str) -> datetime | None:
        return await _thread(self.sync.cursor, source)

    async def snapshots(self, source: str, appointment_ids: Sequence[str]) -> dict[str, Snapshot]:
        return await _thread(self.sync.snapshots, source, appointment_ids)

    async def window_snapshots(self, source: str, start: datetime, end: datetime) -> dict[str, Snapshot]:
        return await _thread(self.sync.window_snapshots, source, start, end)

    async def snapshot(self, source: str, appointment_id: str) -> Snapshot | None:
        return await _thread(self.sync.snapshot, source, appointment_id)

    async def notified(self, source: str, appointment_ids: Sequence[str]) -> set[tuple[str, str]]:
        return await _thread(self.sync.notified, source, appointment_ids)

    async def prune_seen(self, source: str, before: datetime) -> int:
        return await _thread(self.sync.prune_seen, source, before)

    async def try_lock_source(self, source: str) -> object:
        return await _thread(self.sync.try_lock_source, source)

    async def unlock_source(self, handle: object) -> None:
        return await _thread(self.sync.unlock_source, handle)

    async def heard(
        self, source: str, subscription: str, events: int | None, status: str | None, when: datetime
    ) -> int | None:
        return await _thread(self.sync.heard, source, subscription, events, status, when)

    async def subscriptions(self, source: str) -> list[tuple[str, int, str | None, datetime]]:
        return await _thread(self.sync.subscriptions, source)


class AsyncOutbox:
    def __init__(self, role: SqlOutbox) -> None:
        self.sync = role

    async def claim_due(
        self, now: datetime, limit: int, owner: str, lease_until: datetime, wall_now: datetime, skip: Sequence[int] = ()
    ) -> list[NotificationRecord]:
        return await _thread(self.sync.claim_due, now, limit, owner, lease_until, wall_now, skip)

    async def start_sending(self, notification_ids: int | Sequence[int], owner: str, lease_until: datetime) -> set[int]:
        return await _thread(self.sync.start_sending, notification_ids, owner, lease_until)

    async def finish(self, results: Sequence[SendResult]) -> None:
        return await _thread(self.sync.finish, results)

    async def settle(self, notification_id: int, owner: str, state: State, reason: str) -> None:
        return await _thread(self.sync.settle, notification_id, owner, state, reason)

    async def prepare_failed(self, notification_id: int, owner: str, reason: str, due_at: datetime | None) -> None:
        return await _thread(self.sync.prepare_failed, notification_id, owner, reason, due_at)

    async def release(self, owner: str | None, notification_ids: Sequence[int] | None = None) -> int:
        return await _thread(self.sync.release, owner, notification_ids)

    async def mark_interrupted(self, wall_now: datetime, everything: bool) -> int:
        return await _thread(self.sync.mark_interrupted, wall_now, everything)


class AsyncAfterSend:
    def __init__(self, role: SqlAfterSend) -> None:
        self.sync = role

    async def confirm(self, key: str, tracking_id: str | None, reason: str) -> bool:
        return await _thread(self.sync.confirm, key, tracking_id, reason)

    async def record_delivery(
        self, key: str | None, tracking_id: str | None, status: str, rank: int, when: datetime, via: str = "webhook"
    ) -> bool:
        return await _thread(self.sync.record_delivery, key, tracking_id, status, rank, when, via)

    async def awaiting_receipt(self, sent_before: datetime, limit: int) -> list[NotificationRecord]:
        return await _thread(self.sync.awaiting_receipt, sent_before, limit)

    async def overdue_in_doubt(self, updated_before: datetime, limit: int) -> list[NotificationRecord]:
        return await _thread(self.sync.overdue_in_doubt, updated_before, limit)

    async def mark_alerted(self, notification_ids: Sequence[int]) -> None:
        return await _thread(self.sync.mark_alerted, notification_ids)

    async def resend(
        self,
        notification_id: int,
        due_at: datetime,
        reason: str,
        from_states: Sequence[State],
        first_only: bool = False,
    ) -> bool:
        return await _thread(self.sync.resend, notification_id, due_at, reason, from_states, first_only)


class AsyncInbox:
    def __init__(self, role: SqlInbox) -> None:
        self.sync = role

    async def add(self, rows: Sequence[dict[str, Any]]) -> int:
        return await _thread(self.sync.add, rows)

    async def pending(self, limit: int, after: int = 0) -> list[Any]:
        return await _thread(self.sync.pending, limit, after)

    async def window(self, source: str, since: datetime | None, until: datetime | None) -> list[Any]:
        return await _thread(self.sync.window, source, since, until)

    async def get(self, inbox_id: int) -> Any:
        return await _thread(self.sync.get, inbox_id)

    async def commit(
        self,
        inbox_ids: Sequence[int],
        notifications: Sequence[PlannedNotification],
        quarantined: Sequence[tuple[str, SeenVersion]] = (),
        states: Sequence[tuple[str, str, Snapshot | None]] = (),
        withdrawals: Sequence[tuple[str, Withdrawal]] = (),
    ) -> list[str]:
        return await _thread(self.sync.commit, inbox_ids, notifications, quarantined, states, withdrawals)

    async def purge(self, received_before: datetime) -> int:
        return await _thread(self.sync.purge, received_before)


class AsyncOptOuts:
    def __init__(self, role: SqlOptOuts) -> None:
        self.sync = role

    async def add(
        self, kind: str, digest: str, hint: str, note: str | None, category: str = "", origin: str = "operator"
    ) -> bool:
        return await _thread(self.sync.add, kind, digest, hint, note, category, origin)

    async def matches_many(self, candidate_lists: Sequence[Sequence[tuple[str, str]]]) -> list[list[OptOut]]:
        return await _thread(self.sync.matches_many, candidate_lists)

    async def opted_out(self, candidates: Sequence[tuple[str, str]]) -> OptOut | None:
        return await _thread(self.sync.opted_out, candidates)

    async def opted_out_many(self, candidate_lists: Sequence[Sequence[tuple[str, str]]]) -> list[OptOut | None]:
        return await _thread(self.sync.opted_out_many, candidate_lists)


class AsyncPatientLinks:
    def __init__(self, role: SqlPatientLinks) -> None:
        self.sync = role

    async def notification(self, notification_id: int) -> NotificationRecord | None:
        return await _thread(self.sync.notification, notification_id)

    async def remember(self, notification_id: int, kind: str, digest: str, key_id: str, when: datetime) -> None:
        return await _thread(self.sync.remember, notification_id, kind, digest, key_id, when)

    async def recipients(self, notification_id: int) -> list[tuple[str, str, str]]:
        return await _thread(self.sync.recipients, notification_id)

    async def forget(self, recorded_before: datetime) -> int:
        return await _thread(self.sync.forget, recorded_before)

    async def unsubscribe(
        self,
        notification_id: int,
        category: str,
        mappings: Sequence[str],
        reason: str,
        when: datetime,
        key_ids: Collection[str],
    ) -> tuple[int, int]:
        return await _thread(self.sync.unsubscribe, notification_id, category, mappings, reason, when, key_ids)

    async def withdraw(self, source: str, patient_id: str, mappings: Sequence[str], reason: str) -> int:
        return await _thread(self.sync.withdraw, source, patient_id, mappings, reason)


class AsyncReports:
    def __init__(self, role: SqlReports) -> None:
        self.sync = role

    async def existing(self, keys: Sequence[str]) -> dict[str, NotificationRecord]:
        return await _thread(self.sync.existing, keys)

    async def due(self, now: datetime, limit: int) -> list[NotificationRecord]:
        return await _thread(self.sync.due, now, limit)

    async def add_rejections(self, counts: Mapping[tuple[str, str], int], when: datetime) -> None:
        return await _thread(self.sync.add_rejections, counts, when)


class AsyncHealth:
    def __init__(self, role: SqlHealth) -> None:
        self.sync = role

    async def poll_completed(self, source: str, when: datetime) -> None:
        return await _thread(self.sync.poll_completed, source, when)

    async def poll_failed(self, source: str, when: datetime, problem: str) -> None:
        return await _thread(self.sync.poll_failed, source, when, problem)

    async def mailer_changed(self, facts: MailerFacts, when: datetime) -> None:
        return await _thread(self.sync.mailer_changed, facts, when)


class AsyncOperator:
    def __init__(self, role: SqlOperator) -> None:
        self.sync = role

    async def count(self, selection: Selection, states: Sequence[State] = ()) -> dict[State, int]:
        return await _thread(self.sync.count, selection, states)

    async def page(
        self, selection: Selection, after: int | None, limit: int, states: Sequence[State] = ()
    ) -> list[NotificationRecord]:
        return await _thread(self.sync.page, selection, after, limit, states)

    async def settle(
        self, selection: Selection, to_state: State, from_states: Sequence[State], actor: str | Audit, reason: str = ""
    ) -> Changed:
        return await _thread(self.sync.settle, selection, to_state, from_states, actor, reason)

    async def requeue(
        self, selection: Selection, due_at: datetime, from_states: Sequence[State], actor: str | Audit, reason: str = ""
    ) -> Changed:
        return await _thread(self.sync.requeue, selection, due_at, from_states, actor, reason)

    async def history(self, notification_id: int) -> list[AuditEntry]:
        return await _thread(self.sync.history, notification_id)


class AsyncJournal:
    def __init__(self, role: SqlJournal) -> None:
        self.sync = role

    async def purge(self, before: datetime) -> int:
        return await _thread(self.sync.purge, before)


class AsyncConsole:
    """The console's reads and actions (connector.ledger.console, and the reports and health roles it shows),
    each a blocking call run on a worker thread."""

    def __init__(self, ledger: SqlLedger) -> None:
        self.sync = ledger

    async def run(self, call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await _thread(call, *args, **kwargs)


class AsyncWriteBacks:
    def __init__(self, role: SqlWriteBacks) -> None:
        self.sync = role

    async def enqueue(self, kinds: Mapping[str, Sequence[str]], since: datetime, limit: int = 500) -> int:
        return await _thread(self.sync.enqueue, kinds, since, limit)

    async def claim(self, now: datetime, limit: int, owner: str, lease_until: datetime) -> list[WriteBackJob]:
        return await _thread(self.sync.claim, now, limit, owner, lease_until)

    async def done(self, job_id: int, owner: str, resource_id: str) -> bool:
        return await _thread(self.sync.done, job_id, owner, resource_id)

    async def retry(self, job_id: int, owner: str, reason: str, due_at: datetime) -> bool:
        return await _thread(self.sync.retry, job_id, owner, reason, due_at)

    async def refuse(self, job_id: int, owner: str, reason: str) -> bool:
        return await _thread(self.sync.refuse, job_id, owner, reason)

    async def release(self, owner: str) -> int:
        return await _thread(self.sync.release, owner)


class AsyncCaps:
    def __init__(self, role: SqlCaps) -> None:
        self.sync = role

    async def sent_between(
        self, source: str, patient_id: str, since: datetime, until: datetime, leaving_out: Sequence[int] = ()
    ) -> int:
        return await _thread(self.sync.sent_between, source, patient_id, since, until, leaving_out)

    async def defer(self, notification_id: int, owner: str, due_at: datetime, reason: str) -> bool:
        return await _thread(self.sync.defer, notification_id, owner, due_at, reason)


class AsyncBounces:
    def __init__(self, role: SqlBounces) -> None:
        self.sync = role

    async def bounced(
        self,
        key: str,
        digest: str,
        key_id: str | None,
        hint: str,
        *,
        hard: bool,
        now: datetime,
        soft_limit: int,
        soft_window: timedelta,
    ) -> Tally | None:
        return await _thread(
            self.sync.bounced,
            key,
            digest,
            key_id,
            hint,
            hard=hard,
            now=now,
            soft_limit=soft_limit,
            soft_window=soft_window,
        )

    async def suppressed(self, source: str, patient_id: str, digests: Sequence[str]) -> Tally | None:
        return await _thread(self.sync.suppressed, source, patient_id, digests)

    async def suppressed_many(self, lookups: Sequence[tuple[str, str, Sequence[str]]]) -> list[Tally | None]:
        return await _thread(self.sync.suppressed_many, lookups)


@dataclass(frozen=True)
class AsyncLedger:
    """Every role of one SqlLedger, async, as its Protocol (mypy checks here that each class implements it)."""

    intake: abc.Intake
    outbox: abc.Outbox
    after_send: abc.AfterSend
    inbox: abc.Inbox
    optouts: abc.OptOuts
    reports: abc.Reports
    health: abc.Health
    operator: abc.Operator
    links: abc.PatientLinks
    write_backs: abc.WriteBacks
    caps: abc.Caps
    bounces: abc.Bounces
    journal: abc.Journal

    @classmethod
    def over(cls, ledger: SqlLedger) -> AsyncLedger:
        return cls(
            AsyncIntake(ledger.intake),
            AsyncOutbox(ledger.outbox),
            AsyncAfterSend(ledger.after_send),
            AsyncInbox(ledger.inbox),
            AsyncOptOuts(ledger.optouts),
            AsyncReports(ledger.reports),
            AsyncHealth(ledger.health),
            AsyncOperator(ledger.operator),
            AsyncPatientLinks(ledger.links),
            AsyncWriteBacks(ledger.write_backs),
            AsyncCaps(ledger.caps),
            AsyncBounces(ledger.bounces),
            AsyncJournal(ledger.journal),
        )
