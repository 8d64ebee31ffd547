"""Ledger tables (SQLModel). Changes here need a new Alembic revision in migrations/versions/.

No table holds a rendered message, an email address or any other patient data: only ids, names of
mappings and sources, states, reasons and times.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, Column, DateTime, Index, LargeBinary, String, UniqueConstraint, text
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


def _when(nullable: bool = False, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class NotificationRow(SQLModel, table=True):
    __tablename__ = "notification"
    __table_args__ = (
        UniqueConstraint("key", name="uq_notification_key"),
        Index("ix_notification_state_due", "state", "due_at"),
        Index("ix_notification_resource", "source", "resource_id"),
        Index("ix_notification_tracking", "tracking_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
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

    id: int | None = Field(default=None, primary_key=True)
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


class LinkRecipientRow(SQLModel, table=True):
    """Where a notification's email went, as its unsubscribe link needs it: the keyed opt-out digest of the
    address (connector.optout, under `key_id`), recorded when the email is prepared. An unsubscribe adds
    exactly this entry to the opt-out list, without reading the EHR; no address is stored. Forgotten once
    the email's unsubscribe link has expired (`links.ttl` after the last preparation)."""

    __tablename__ = "link_recipient"
    __table_args__ = (Index("ix_link_recipient_recorded_at", "recorded_at"),)

    notification_id: int = Field(primary_key=True)
    kind: str = Field(primary_key=True, max_length=16)
    digest: str = Field(primary_key=True, max_length=64)
    key_id: str = Field(max_length=64)
    recorded_at: datetime = _when()
