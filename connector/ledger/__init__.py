"""The ledger: the record of every notification under its unique key, and of each source's progress.

    abc.py        one Protocol per role, as the daemon's async code sees it (the contract is stated there)
    sql.py        SqlLedger: the roles over one engine, and how a config opens it
    engine.py     the engine, the tables, what every role shares
    intake.py, outbox.py, after_send.py, inbox.py, optouts.py, reports.py, health.py    the roles (SQL)
    writes.py     statements more than one role makes inside its own transaction
    aio.py        the async face: the one place that crosses into threads
    batching.py   group commit of concurrent calls
    schema.py, migrate.py, migrations/    tables and their Alembic revisions

This module holds the ledger's value types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from connector.models import State


@dataclass(frozen=True)
class SeenVersion:
    resource_type: str
    resource_id: str
    version: str
    last_updated: datetime | None
    problem: str | None = None  # set: quarantined, with the reason
    seen_at: datetime | None = None  # when it was recorded (read back from the ledger)


@dataclass(frozen=True)
class Withdrawal:
    """Cancel the pending notifications of these patients for one appointment."""

    appointment_id: str
    patients: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class OptOut:
    kind: str  # "identifier" or "email"
    digest: str
    hint: str
    note: str | None
    created_at: datetime
    key_id: str | None = None  # the optout.keys entry that keyed the digest; None: unkeyed (before 0.2)
    category: str = ""  # '': every email; else the mappings of that `category:` only
    origin: str = "operator"  # link (the patient's unsubscribe), bounce, operator


@dataclass(frozen=True)
class NotificationRecord:
    id: int
    key: str
    source: str
    mapping: str
    event: str
    resource_type: str
    resource_id: str
    resource_version: str
    patient_id: str
    state: State
    reason: str | None
    attempts: int
    due_at: datetime
    tracking_id: str | None
    updated_at: datetime
    appointment_start: datetime | None = None
    first_attempt_at: datetime | None = None
    resends: int = 0
    delivery_status: str | None = None


@dataclass(frozen=True)
class SendResult:
    """How a send ended, for the outbox's `finish`: `sent`, `failed` or `in_doubt`; or `pending` to try again
    at `due_at` (`count_attempt` False gives the attempt back: the mailer, not the message, was the problem)."""

    notification_id: int
    state: State
    reason: str | None = None
    tracking_id: str | None = None
    when: datetime | None = None  # when it was sent (state sent)
    due_at: datetime | None = None  # state pending
    count_attempt: bool = True


@dataclass(frozen=True)
class Rekeyed:
    """What `connector optout rekey` did."""

    key_id: str
    converted: int  # unkeyed rows now keyed with `key_id`
    merged: int  # unkeyed rows dropped: the same entry was already there under `key_id`
    by_key: dict[str | None, int] = field(default_factory=dict)  # rows per key id afterwards
    unknown: dict[str, int] = field(default_factory=dict)  # rows under key ids no longer configured
