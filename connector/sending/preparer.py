"""What the dispatcher asks of each kind of notification, and what it may be told.

A preparer (one per kind: connector.sending.appointment, connector.sending.crm) reads what a due
notification needs, checks that it is still wanted and to whom it goes, and renders it:

    prepare(record, mapping, now) -> Email        ready to send
                                   | NotSendable   never to be sent (skipped, failed, cancelled), with why
                                   | NotYet        cannot be prepared now (a source is unreachable): later
                                   | NoSource      the source it names is not configured (any more): later
                                   | Gone          the source no longer has the appointment

The dispatcher decides what each answer means for the ledger. The one answer that concerns intake, `Gone`,
is passed on through `Deletions` (which the wiring connects to the planner) before the notification is
settled, so that what the deletion withdraws is recorded first and a cancellation it plans goes out in the
same run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from connector.models import Email, State

if TYPE_CHECKING:
    from connector.ledger import NotificationRecord
    from connector.mapping.loader import Mapping


@dataclass(frozen=True)
class NotSendable:
    state: State  # skipped (a rule), failed (bad data) or cancelled (no longer wanted)
    reason: str


@dataclass(frozen=True)
class NotYet:
    """Cannot be prepared now (a source or the CRM's API is unreachable): the notification waits for the
    next pass."""

    reason: str


@dataclass(frozen=True)
class NoSource:
    """The notification names a source this process does not have (its config changed)."""

    source: str


@dataclass(frozen=True)
class Gone:
    """The source no longer has the appointment (it was deleted)."""

    source: str
    resource_id: str


Prepared = Email | NotSendable | NotYet | NoSource | Gone


class Preparer(Protocol):
    async def read_ahead(self, batch: list[NotificationRecord]) -> None:
        """Read what the notifications of its kind in a claimed batch need, in as few requests as it can
        (best effort: `prepare` reads what is still missing)."""
        ...

    async def prepare(self, n: NotificationRecord, mapping: Mapping, now: datetime) -> Prepared: ...


class Deletions(Protocol):
    """Where the dispatcher reports an appointment the source no longer has (intake's planner)."""

    async def deleted(self, source: str, resource_id: str) -> object: ...
