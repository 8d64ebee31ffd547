"""Ledger tables (SQLModel). Changes here need a new Alembic revision in migrations/versions/.

No table holds a rendered message, an email address or any other patient data: only ids, names of
mappings and sources, states, reasons and times.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite (no zones) and PostgreSQL alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


# A row id that outlives 2**31 rows on PostgreSQL (revision 0016: BIGINT and a bigint sequence); on SQLite an
# INTEGER PRIMARY KEY is already the 64-bit rowid, and must stay spelt INTEGER to be one.
LargeId = BigInteger().with_variant(Integer(), "sqlite")


def _row_id() -> Any:
    return Field(default=None, sa_column=Column(LargeId, primary_key=True, autoincrement=True))


def _when(nullable: bool = False, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class NotificationRow(SQLModel, table=True):
    __tablename__ = "notification"
    __table_args__ = (
        UniqueConstraint("key", name="uq_notification_key"),
        Index("ix_notification_state_due", "state", "due_at"),
        Index("ix_notification_resource", "source", "resource_id"),
        Index("ix_notification_tracking", "tracking_id"),
        Index("ix_notification_state_updated", "state", "updated_at"),  # selections by state and window
        # the console's searches, newest first (keyset on id) and its charts (revision 0011)
        Index("ix_notification_appointment", "resource_id", "id"),
        Index("ix_notification_patient", "patient_id", "id"),
        Index("ix_notification_state_id", "state", "id"),
        Index("ix_notification_updated", "updated_at"),
        Index("ix_notification_source_patient", "source", "patient_id"),  # the daily cap (revision 0013)
    )

    id: int | None = _row_id()
    key: str = Field(sa_column=Column(String(512), nullable=False))
    source: str = Field(max_length=64)
    mapping: str = Field(max_length=64)
    event: str = Field(max_length=32)
    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=128)
    resource_version: str = Field(max_length=128)
    patient_id: str = Field(max_length=128)
    state: str = Field(max_length=16)
    reason: str | None = Field(default=None, max_length=500)
    attempts: int = 0
    due_at: datetime = _when()
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_until: datetime | None = _when(nullable=True)
    tracking_id: str | None = Field(default=None, max_length=128)
    appointment_start: datetime | None = _when(nullable=True)  # the start it was planned for
    first_attempt_at: datetime | None = _when(nullable=True)  # for the age limit on retries
    resends: int = 0  # deliberate resends of an in-doubt notification (policy `resend` or an operator)
    delivery_status: str | None = Field(default=None, max_length=32)  # from Paubox webhooks and receipts
    delivery_rank: int = 0  # so that late or repeated events never step the status back
    delivery_updated_at: datetime | None = _when(nullable=True)
    alerted_at: datetime | None = _when(nullable=True)  # in_doubt reported to the operators
    created_at: datetime = _when()
    updated_at: datetime = _when()
    sent_at: datetime | None = _when(nullable=True)


class CursorRow(SQLModel, table=True):
    """A source's watermark: the highest meta.lastUpdated whose notifications are committed."""

    __tablename__ = "source_cursor"

    source: str = Field(primary_key=True, max_length=64)
    value: datetime = _when()
    updated_at: datetime = _when()


class SeenVersionRow(SQLModel, table=True):
    """Resource versions already handled (or rejected as invalid, with the reason)."""

    __tablename__ = "seen_version"
    __table_args__ = (
        Index("ix_seen_version_last_updated", "source", "last_updated"),
        Index(
            "ix_seen_version_problem",
            "source",
            postgresql_where=text("problem IS NOT NULL"),
            sqlite_where=text("problem IS NOT NULL"),
        ),
    )

    source: str = Field(primary_key=True, max_length=64)
    resource_type: str = Field(primary_key=True, max_length=64)
    resource_id: str = Field(primary_key=True, max_length=128)
    version: str = Field(primary_key=True, max_length=128)
    last_updated: datetime | None = _when(nullable=True)
    problem: str | None = Field(default=None, max_length=500)
    seen_at: datetime = _when()


class AppointmentStateRow(SQLModel, table=True):
    """The last seen state of an appointment (connector.lifecycle.Snapshot): ids and times only."""

    __tablename__ = "appointment_state"

    source: str = Field(primary_key=True, max_length=64)
    appointment_id: str = Field(primary_key=True, max_length=128)
    status: str = Field(max_length=32)
    start: datetime | None = _when(nullable=True)
    end: datetime | None = _when(nullable=True)
    version: str = Field(max_length=128)
    patients: str = Field(max_length=2000, description="patient ids, space-separated")
    last_updated: datetime | None = _when(nullable=True)
    deleted: bool = Field(default=False, sa_column=Column(Boolean(), nullable=False))
    updated_at: datetime = _when()


class OptOutRow(SQLModel, table=True):
    """Who must not be written to: a patient identifier or an address, stored as a keyed digest
    (connector.optout) with a short masked hint for people (never the value itself)."""

    __tablename__ = "optout"
    __table_args__ = (UniqueConstraint("kind", "digest", "category", name="uq_optout_kind_digest_category"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16)
    digest: str = Field(max_length=64)
    key_id: str | None = Field(default=None, max_length=64)  # None: an unkeyed SHA-256 (before revision 0008)
    hint: str = Field(max_length=200)
    note: str | None = Field(default=None, max_length=500)
    category: str = Field(default="", sa_column=Column(String(64), nullable=False, server_default=""))  # '': all
    origin: str = Field(  # who put it there: link (the patient), bounce, operator
        default="operator", sa_column=Column(String(16), nullable=False, server_default="operator")
    )
    created_at: datetime = _when()


class SubscriptionStateRow(SQLModel, table=True):
    """What a FHIR Subscription has told us: its event counter and when we last heard from it."""

    __tablename__ = "subscription_state"

    source: str = Field(primary_key=True, max_length=64)
    subscription: str = Field(primary_key=True, max_length=300)
    events: int = Field(default=0, sa_column=Column(BigInteger(), nullable=False))
    status: str | None = Field(default=None, max_length=32)
    last_seen: datetime = _when()


class InboxEventRow(SQLModel, table=True):
    """A received CRM event: its payload sealed with AES-256-GCM (nonce + ciphertext), never in clear."""

    __tablename__ = "inbox_event"
    __table_args__ = (
        UniqueConstraint("source", "event_id", name="uq_inbox_source_event"),
        Index("ix_inbox_pending", "processed_at", "id"),
    )

    id: int | None = _row_id()
    source: str = Field(max_length=64)
    event_id: str = Field(max_length=200)
    event_type: str = Field(max_length=100)
    received_at: datetime = _when()
    key_id: str = Field(max_length=64)
    sealed: bytes = Field(sa_column=Column(LargeBinary(), nullable=False))
    processed_at: datetime | None = _when(nullable=True)


class RejectionRow(SQLModel, table=True):
    """How many webhook requests were refused, by endpoint and reason (never their content)."""

    __tablename__ = "rejection"

    endpoint: str = Field(primary_key=True, max_length=80)
    reason: str = Field(primary_key=True, max_length=100)
    total: int = Field(default=0, sa_column=Column(BigInteger(), nullable=False))
    last_at: datetime = _when()


class ComponentHealthRow(SQLModel, table=True):
    """How a part of the daemon last fared, for `connector status` (another process): `source:<name>` (its
    last completed poll, its last error) and `mailer` (its state and why). No patient data: states, times,
    HTTP statuses and error descriptions that name sources, resource types and ids."""

    __tablename__ = "component_health"

    component: str = Field(primary_key=True, max_length=100)
    state: str = Field(max_length=16)  # sources: ok, failing; mailer: running, paused, broken, probing, blocked
    since: datetime | None = _when(nullable=True)  # when it entered `state`
    last_ok_at: datetime | None = _when(nullable=True)  # sources: the last completed poll
    problem: str | None = Field(default=None, max_length=500)  # the last error (kept after a recovery)
    problem_at: datetime | None = _when(nullable=True)
    updated_at: datetime = _when()


class AuditRow(SQLModel, table=True):
    """What a person did, from the CLI (`connector resolve`, `connector retry`) or the operator console (its
    actions, previews, replays): who (`actor`: `cli:<os account>` or a console user), as which `role` (cli,
    viewer, operator), when, which action, on which notification (one row per notification changed, with
    the states it went from and to) or on how many (a row for a filter, its `scope` in words), and the
    reason given. Ids, states and times only: no patient data (revision 0014; it replaces `operator_action`
    and `console_audit`)."""

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_notification", "notification_id", "id"),)

    id: int | None = _row_id()
    at: datetime = _when(index=True)
    actor: str = Field(max_length=64)
    role: str = Field(max_length=16)  # cli, viewer, operator
    action: str = Field(max_length=32)  # resolve-sent, resolve-resend, resolve-cancel, retry, preview, replay
    notification_id: int | None = Field(default=None, sa_column=Column(BigInteger(), nullable=True))
    from_state: str | None = Field(default=None, max_length=16)
    to_state: str | None = Field(default=None, max_length=16)
    scope: str | None = Field(default=None, max_length=500)  # a filter acted on, in words without patient data
    count: int = 0  # how many notifications the action changed
    reason: str = Field(max_length=500)


class JournalRow(SQLModel, table=True):
    """What happened, append-only, written in the transaction that made it happen: a notification planned,
    withdrawn, claimed, sending, its outcome, webhooks and receipts (delivery statuses), doubt settled; an
    appointment's transitions as intake saw them (status, version). Ids, states, reasons and times only:
    never patient data, never keys. Purged after `ledger.journal_retention` (revision 0014)."""

    __tablename__ = "journal"
    __table_args__ = (
        Index("ix_journal_notification", "notification_id", "id"),
        Index("ix_journal_appointment", "appointment_id", "id"),
    )

    id: int | None = _row_id()
    at: datetime = _when(index=True)
    notification_id: int | None = Field(default=None, sa_column=Column(BigInteger(), nullable=True))
    source: str | None = Field(default=None, max_length=64)
    appointment_id: str | None = Field(default=None, max_length=128)  # appointment events only
    event: str = Field(max_length=32)  # planned, withdrawn, claimed, sending, outcome, delivery, ...
    state: str | None = Field(default=None, max_length=32)  # the state (or delivery / appointment status) after
    detail: str | None = Field(default=None, max_length=500)  # a reason, a version, a tracking id


class WriteBackRow(SQLModel, table=True):
    """A write to the EHR owed for one notification (`kind`: communication, not-done): tried until the
    server accepts it (`done`, with the id it gave) or refuses it (`refused`, a person must look), with a
    backoff between tries. Ids, states, reasons and times only."""

    __tablename__ = "write_back"
    __table_args__ = (
        UniqueConstraint("notification_id", "kind", name="uq_write_back_notification_kind"),
        Index("ix_write_back_state_due", "state", "due_at"),
    )

    id: int | None = _row_id()
    notification_id: int = Field(sa_column=Column(BigInteger(), nullable=False))
    kind: str = Field(max_length=16)
    source: str = Field(max_length=64)
    state: str = Field(max_length=16)  # pending, done, refused
    attempts: int = 0
    due_at: datetime = _when()
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_until: datetime | None = _when(nullable=True)
    reason: str | None = Field(default=None, max_length=500)  # the last problem
    resource_id: str | None = Field(default=None, max_length=128)  # what the EHR gave it
    created_at: datetime = _when()
    updated_at: datetime = _when()


class AddressSuppressionRow(SQLModel, table=True):
    """An address of one patient that bounced (source `bounce`): soft bounces counted in a window, and when
    it was suppressed (a hard bounce, or too many soft ones) until an operator or a new address clears it.
    The address is a keyed digest (connector.optout) with a masked hint, never the value."""

    __tablename__ = "address_suppression"
    __table_args__ = (UniqueConstraint("source", "patient_id", "digest", name="uq_address_suppression"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=64)
    patient_id: str = Field(max_length=128)
    digest: str = Field(max_length=64)
    key_id: str | None = Field(default=None, max_length=64)
    hint: str = Field(max_length=200)
    origin: str = Field(default="bounce", max_length=16)
    soft_count: int = 0
    soft_since: datetime | None = _when(nullable=True)  # the first soft bounce counted in the window
    suppressed_at: datetime | None = _when(nullable=True)
    reason: str | None = Field(default=None, max_length=200)
    cleared_at: datetime | None = _when(nullable=True)
    updated_at: datetime = _when()


class LinkRecipientRow(SQLModel, table=True):
    """Where a notification's email went, as its unsubscribe link needs it: the keyed opt-out digest of the
    address (connector.optout, under `key_id`), recorded when the email is prepared. An unsubscribe adds
    exactly this entry to the opt-out list, without reading the EHR; no address is stored. Forgotten once
    the email's unsubscribe link has expired (`links.ttl` after the last preparation)."""

    __tablename__ = "link_recipient"
    __table_args__ = (Index("ix_link_recipient_recorded_at", "recorded_at"),)

    notification_id: int = Field(sa_column=Column(LargeId, primary_key=True, autoincrement=False))
    kind: str = Field(primary_key=True, max_length=16)
    digest: str = Field(primary_key=True, max_length=64)
    key_id: str = Field(max_length=64)
    recorded_at: datetime = _when()


class ConsoleSignOutRow(SQLModel, table=True):
    """A console session signed out (revision 0015): the SHA-256 of its CSRF token (unique to each sign-in;
    the token itself is not kept) and until when its cookie could still be shown (its lifetime from the
    sign-out). Every process serving the console refuses a cookie of a session named here, so a sign-out
    holds across replicas and restarts; rows past `until` are forgotten at the next sign-out."""

    __tablename__ = "console_signout"

    session: str = Field(primary_key=True, max_length=64)
    until: datetime = _when(index=True)
