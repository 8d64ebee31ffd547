"""Immutable values that flow through the pipeline: events, planned notifications, emails.

Where PHI lives: `Email` holds patient data in memory only. Nothing here
is logged; the ledger stores `PlannedNotification` fields, which are ids, names of mappings and times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


def fixed_clock(instant: datetime) -> Clock:
    """A clock stopped at `instant` (for `--now` and tests)."""
    return lambda: instant


class State(StrEnum):
    """Where a notification is in its life. Terminal: sent, failed, in_doubt, cancelled, skipped."""

    PENDING = "pending"  # waiting for its due time
    SENDING = "sending"  # committed just before the request left; a crash here means in_doubt
    SENT = "sent"  # Paubox answered 200 with a sourceTrackingId
    FAILED = "failed"  # Paubox refused it for good, or it could not be rendered
    IN_DOUBT = "in_doubt"  # the request may or may not have reached Paubox; never resent blindly
    CANCELLED = "cancelled"  # withdrawn before sending
    SKIPPED = "skipped"  # never to be sent (no address, appointment in the past, ...)


@dataclass(frozen=True)
class PlannedNotification:
    """A notification the mappings decided on; inserted into the ledger under its unique key."""

    key: str
    source: str
    mapping: str
    event: str
    resource_type: str
    resource_id: str
    resource_version: str
    patient_id: str
    due_at: datetime
    state: State = State.PENDING
    reason: str | None = None
    appointment_start: datetime | None = None


@dataclass(frozen=True)
class PlanNote:
    """A mapping that did not produce a notification, and why (safe to log: no resource content)."""

    mapping: str
    patient_id: str
    message: str
    problem: bool = False  # True: something is wrong (a failing condition or key template)


@dataclass(frozen=True)
class Attachment:
    """A file sent with an email (an iCalendar invitation)."""

    filename: str
    content_type: str  # e.g. "text/calendar; method=REQUEST"
    content: bytes


@dataclass(frozen=True)
class Email:
    """A rendered message, ready for a mailer. PHI: never logged, never stored."""

    notification_key: str
    to: str
    from_address: str
    subject: str
    text: str
    html: str | None = None
    reply_to: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    attachments: tuple[Attachment, ...] = ()
