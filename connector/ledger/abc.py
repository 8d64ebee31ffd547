"""Every interface of the ledger, in one place: one Protocol per role, as the daemon's async code sees it.

Callers depend on these, never on the SQL classes: the planner on `Intake`, the dispatcher on `Outbox`,
aftercare on `AfterSend`, the CRM intake on `Inbox`, sending on `OptOuts`, replays and dry runs on
`Reports`, the health monitor on `Health`, a person's commands and console on `Operator`, EHR write-back
on `WriteBacks`. connector.ledger.aio implements them over the SQL roles (connector.ledger.sql); the one-shot
ledger commands of the CLI (status, resolve, retry, optout, db upgrade) use the SQL roles directly,
synchronously.

The contract every implementation keeps:
- duplicates are decided by the UNIQUE key at insert time (a conflict means "already there");
- a notification is committed as `sending` before its request leaves, so a crash leaves `in_doubt`;
- a source's cursor moves in the same transaction as the notifications it produced, and never back.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from connector.bounces import Tally
    from connector.health import MailerFacts
    from connector.ledger import NotificationRecord, OptOut, SeenVersion, SendResult, Withdrawal
    from connector.ledger.operator import Audit, AuditEntry, Changed, Selection
    from connector.ledger.writeback import WriteBackJob
    from connector.lifecycle import Snapshot
    from connector.models import PlannedNotification, State


class Intake(Protocol):
    """What intake records and reads: pages with their versions, states and cursor; the poll lock."""

    async def record_page(
        self,
        source: str,
        notifications: Sequence[PlannedNotification],
        seen: Sequence[SeenVersion],
        cursor: datetime | None,
        snapshots: Mapping[str, Snapshot | None] | None = None,
        withdrawals: Sequence[Withdrawal] = (),
    ) -> list[str]: ...

    async def new_versions(
        self, source: str, versions: Sequence[tuple[str, str, str]]
    ) -> set[tuple[str, str, str]]: ...

    async def cursor(self, source: str) -> datetime | None: ...

    async def snapshots(self, source: str, appointment_ids: Sequence[str]) -> dict[str, Snapshot]: ...

    async def window_snapshots(self, source: str, start: datetime, end: datetime) -> dict[str, Snapshot]:
        """Remembered appointments starting in [start, end) that have not ended (for date-window polls)."""
        ...

    async def snapshot(self, source: str, appointment_id: str) -> Snapshot | None:
        """The remembered state, deleted or not (to render a cancellation after a delete)."""
        ...

    async def notified(self, source: str, appointment_ids: Sequence[str]) -> set[tuple[str, str]]: ...

    async def prune_seen(self, source: str, before: datetime) -> int: ...

    async def try_lock_source(self, source: str) -> object:
        """A handle that holds this source's poll lock until `unlock_source`, or False: another replica polls it."""
        ...

    async def unlock_source(self, handle: object) -> None: ...

    async def heard(
        self, source: str, subscription: str, events: int | None, status: str | None, when: datetime
    ) -> int | None:
        """Note a notification; returns the event count known before it (None: never heard of it)."""
        ...

    async def subscriptions(self, source: str) -> list[tuple[str, int, str | None, datetime]]: ...


class Outbox(Protocol):
    """The dispatcher's claims and sends (pending → sending → sent | failed | in_doubt, leases)."""

    async def claim_due(
        self, now: datetime, limit: int, owner: str, lease_until: datetime, wall_now: datetime, skip: Sequence[int] = ()
    ) -> list[NotificationRecord]:
        """Lease up to `limit` due notifications to `owner`, oldest first; `skip`: ids not wanted now."""
        ...

    async def start_sending(self, notification_ids: int | Sequence[int], owner: str, lease_until: datetime) -> set[int]:
        """pending → sending for those still leased by `owner`, committed before any request leaves; the ids
        that may be sent now."""
        ...

    async def finish(self, results: Sequence[SendResult]) -> None:
        """Record how sends ended, all in one transaction."""
        ...

    async def settle(self, notification_id: int, owner: str, state: State, reason: str) -> None: ...

    async def prepare_failed(self, notification_id: int, owner: str, reason: str, due_at: datetime | None) -> None:
        """Preparing a leased notification crashed: one attempt spent; pending again at `due_at`, or failed (None)."""
        ...

    async def release(self, owner: str | None, notification_ids: Sequence[int] | None = None) -> int: ...

    async def mark_interrupted(self, wall_now: datetime, everything: bool) -> int: ...


class AfterSend(Protocol):
    """What is learnt after a send: webhooks, delivery statuses, receipts, doubt and resends."""

    async def confirm(self, key: str, tracking_id: str | None, reason: str) -> bool:
        """Paubox has the message (a webhook named its key): in_doubt → sent. True when it was in doubt."""
        ...

    async def record_delivery(
        self, key: str | None, tracking_id: str | None, status: str, rank: int, when: datetime, via: str = "webhook"
    ) -> bool:
        """Store a delivery status unless a stronger one is already there; by key, else by tracking id."""
        ...

    async def awaiting_receipt(self, sent_before: datetime, limit: int) -> list[NotificationRecord]:
        """Sent notifications with a tracking id and no delivery status yet."""
        ...

    async def overdue_in_doubt(self, updated_before: datetime, limit: int) -> list[NotificationRecord]:
        """In-doubt notifications nobody has confirmed since `updated_before` and not yet handled."""
        ...

    async def mark_alerted(self, notification_ids: Sequence[int]) -> None: ...

    async def resend(
        self,
        notification_id: int,
        due_at: datetime,
        reason: str,
        from_states: Sequence[State],
        first_only: bool = False,
    ) -> bool:
        """A deliberate second send of the same key (same X-Notification-Key): → pending, resends + 1."""
        ...


class Inbox(Protocol):
    """Sealed CRM events: stored when received, planned, purged after their retention."""

    async def add(self, rows: Sequence[dict[str, Any]]) -> int:
        """Store received events (one already there is left alone); returns how many were new."""
        ...

    async def pending(self, limit: int, after: int = 0) -> list[Any]: ...

    async def window(self, source: str, since: datetime | None, until: datetime | None) -> list[Any]: ...

    async def get(self, inbox_id: int) -> Any: ...

    async def commit(
        self,
        inbox_ids: Sequence[int],
        notifications: Sequence[PlannedNotification],
        quarantined: Sequence[tuple[str, SeenVersion]] = (),
        states: Sequence[tuple[str, str, Snapshot | None]] = (),
        withdrawals: Sequence[tuple[str, Withdrawal]] = (),
    ) -> list[str]:
        """Planned notifications and the events they came from, marked processed, in one transaction; with
        the CRM appointments' withdrawals and new states ((source, appointment id, state) triples)."""
        ...

    async def purge(self, received_before: datetime) -> int:
        """Forget processed events older than the retention (their notifications keep their keys), except
        the event a remembered CRM appointment that has not started before that time was last told by."""
        ...


class OptOuts(Protocol):
    """The opt-out list, as sending (and a hard bounce) uses it."""

    async def add(
        self, kind: str, digest: str, hint: str, note: str | None, category: str = "", origin: str = "operator"
    ) -> bool:
        """Add an entry (`digest`: the inner digest) for a category ('': every email). False when it is
        already on the list for that category, under any key."""
        ...

    async def matches_many(self, candidate_lists: Sequence[Sequence[tuple[str, str]]]) -> list[list[OptOut]]:
        """Every entry, of any category, matching each recipient's pairs (`optout.applies` picks)."""
        ...

    async def opted_out(self, candidates: Sequence[tuple[str, str]]) -> OptOut | None:
        """The first opt-out matching one of these (kind, inner digest) pairs."""
        ...

    async def opted_out_many(self, candidate_lists: Sequence[Sequence[tuple[str, str]]]) -> list[OptOut | None]:
        """`opted_out` for several recipients in one query."""
        ...


class PatientLinks(Protocol):
    """What the patients' link pages read and change."""

    async def notification(self, notification_id: int) -> NotificationRecord | None: ...

    async def remember(self, notification_id: int, kind: str, digest: str, key_id: str, when: datetime) -> None:
        """Record where a notification's email goes: the keyed opt-out digest of the address (never the address)."""
        ...

    async def recipients(self, notification_id: int) -> list[tuple[str, str, str]]:
        """(kind, keyed digest, key id) of every address this notification's email went to."""
        ...

    async def forget(self, recorded_before: datetime) -> int:
        """Drop the records of emails whose unsubscribe links have all expired; how many."""
        ...

    async def unsubscribe(
        self,
        notification_id: int,
        category: str,
        mappings: Sequence[str],
        reason: str,
        when: datetime,
        key_ids: Collection[str],
    ) -> tuple[int, int]:
        """Opt out the addresses this notification's email went to (origin `link`, for `category`) and
        withdraw the patient's pending notifications of these mappings, in one transaction; (added, withdrawn)."""
        ...

    async def withdraw(self, source: str, patient_id: str, mappings: Sequence[str], reason: str) -> int:
        """Cancel the pending notifications of these mappings for one patient (reason recorded); how many."""
        ...


class Reports(Protocol):
    """Notifications by key and due ones (dry runs, replays); the refusal counts the daemon adds."""

    async def existing(self, keys: Sequence[str]) -> dict[str, NotificationRecord]: ...

    async def due(self, now: datetime, limit: int) -> list[NotificationRecord]:
        """Pending notifications due at `now` (read-only; for dry runs)."""
        ...

    async def add_rejections(self, counts: Mapping[tuple[str, str], int], when: datetime) -> None: ...


class Health(Protocol):
    """The health rows a daemon writes (polls completed or failed, the mailer's state)."""

    async def poll_completed(self, source: str, when: datetime) -> None:
        """A poll of `source` read everything it meant to: the newest completion wins (replicas race)."""
        ...

    async def poll_failed(self, source: str, when: datetime, problem: str) -> None:
        """A poll of `source` failed; `since` keeps the first failure after the last completed poll."""
        ...

    async def mailer_changed(self, facts: MailerFacts, when: datetime) -> None: ...


class Operator(Protocol):
    """What a person selects and does (connector.ledger.operator): a Selection by id, key or filter, counted
    or listed a page at a time (keyset on the id), and settled or queued again in one transaction, each
    change recorded in the audit trail (table `audit`, shared with the console)."""

    async def count(self, selection: Selection, states: Sequence[State] = ()) -> dict[State, int]: ...

    async def page(
        self, selection: Selection, after: int | None, limit: int, states: Sequence[State] = ()
    ) -> list[NotificationRecord]: ...

    async def settle(
        self, selection: Selection, to_state: State, from_states: Sequence[State], actor: str | Audit, reason: str = ""
    ) -> Changed: ...

    async def requeue(
        self, selection: Selection, due_at: datetime, from_states: Sequence[State], actor: str | Audit, reason: str = ""
    ) -> Changed: ...

    async def history(self, notification_id: int) -> list[AuditEntry]: ...


class Journal(Protocol):
    """What happened to each notification and appointment (connector.ledger.journal): written by the other
    roles in their own transactions; here only its retention."""

    async def purge(self, before: datetime) -> int: ...


class WriteBacks(Protocol):
    """Writes owed to the EHR for notifications (connector.ledger.writeback), as the write-back worker uses them."""

    async def enqueue(self, kinds: Mapping[str, Sequence[str]], since: datetime, limit: int = 500) -> int: ...

    async def claim(self, now: datetime, limit: int, owner: str, lease_until: datetime) -> list[WriteBackJob]: ...

    async def done(self, job_id: int, owner: str, resource_id: str) -> bool: ...

    async def retry(self, job_id: int, owner: str, reason: str, due_at: datetime) -> bool: ...

    async def refuse(self, job_id: int, owner: str, reason: str) -> bool: ...

    async def release(self, owner: str) -> int: ...


class Caps(Protocol):
    """What the per-patient daily cap reads and writes (connector.ledger.caps)."""

    async def sent_between(
        self, source: str, patient_id: str, since: datetime, until: datetime, leaving_out: Sequence[int] = ()
    ) -> int: ...

    async def defer(self, notification_id: int, owner: str, due_at: datetime, reason: str) -> bool: ...


class Bounces(Protocol):
    """Addresses suppressed per patient after bounces (connector.ledger.bounces)."""

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
    ) -> Tally | None: ...

    async def suppressed(self, source: str, patient_id: str, digests: Sequence[str]) -> Tally | None: ...

    async def suppressed_many(self, lookups: Sequence[tuple[str, str, Sequence[str]]]) -> list[Tally | None]: ...
