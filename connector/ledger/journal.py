"""The journal: what happened to each notification and appointment, append-only. Each role writes its
entries with `note`, inside the transaction that makes the change (one executemany INSERT per batch of
events), so the journal never tells of something that was rolled back. Ids, states, reasons, times:
never patient data, never keys. The console reads it back; `purge` forgets what is older than
`ledger.journal_retention`.

    event       written by                       state                       detail
    planned     intake (page, CRM event)         pending | skipped | ...     event, resource version, reason
    withdrawn   intake, patient links (unsubscribe)  cancelled               the reason
    appointment intake (remembered states)       the appointment's status    version, transition
    claimed     outbox.claim_due                 pending                     the dispatcher
    deferred    caps.defer (the daily cap)       pending                     the reason
    sending     outbox.start_sending             sending                     attempt number
    outcome     outbox.finish, settle, ...       sent | failed | in_doubt... reason, tracking id
    delivery    after_send.record_delivery       Paubox's delivery status    webhook or receipt
    confirmed   after_send.confirm               sent                        the reason
    resent      after_send.resend                pending                     the reason
    alerted     after_send.mark_alerted          in_doubt                    reported to the operators
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection

from connector.ledger.engine import SqlRole, utcnow
from connector.ledger.schema import JournalRow

J = JournalRow.__table__  # type: ignore[attr-defined]
INSERT = insert(J)


def entry(
    event: str,
    notification_id: int | None = None,
    state: str | None = None,
    detail: str | None = None,
    *,
    at: datetime | None = None,
    source: str | None = None,
    appointment_id: str | None = None,
) -> dict[str, Any]:
    return {
        "at": at or utcnow(),
        "notification_id": notification_id,
        "source": source,
        "appointment_id": appointment_id,
        "event": event,
        "state": state,
        "detail": None if detail is None else detail[:500],
    }


def note(conn: Connection, entries: Sequence[dict[str, Any]]) -> None:
    """Append `entries` (made by `entry`) on the caller's connection, in its transaction."""
    if entries:
        conn.execute(INSERT, list(entries))


@dataclass(frozen=True)
class Event:
    id: int
    at: datetime
    notification_id: int | None
    source: str | None
    appointment_id: str | None
    event: str
    state: str | None
    detail: str | None


class SqlJournal(SqlRole):
    def of_notification(self, notification_id: int, limit: int = 500) -> list[Event]:
        """A notification's events, oldest first."""
        return self._read(J.c.notification_id == notification_id, limit)

    def of_appointment(self, appointment_id: str, limit: int = 500) -> list[Event]:
        """What intake saw of one appointment (status, version), oldest first."""
        return self._read(J.c.appointment_id == appointment_id, limit)

    def purge(self, before: datetime) -> int:
        """Forget events older than `before` (the retention)."""
        with self.engine.begin() as conn:
            return int(conn.execute(delete(J).where(J.c.at < before)).rowcount)

    def _read(self, condition: Any, limit: int) -> list[Event]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(J).where(condition).order_by(J.c.id).limit(limit))
            return [
                Event(r.id, r.at, r.notification_id, r.source, r.appointment_id, r.event, r.state, r.detail)
                for r in rows
            ]
