"""The ledger's engine and what every role shares: the engine for a URL (SQLite with WAL, or PostgreSQL),
the tables, the row → record conversion, the dialect's INSERT, and how to tell an outage from refused data.

Every role (connector.ledger.outbox, .intake, .after_send, .inbox, .optouts, .reports, .health) is a
class over one engine; each of its methods is one short transaction. Duplicates are decided by INSERT … ON
CONFLICT on the unique key.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from connector.errors import LedgerError
from connector.files import create_private
from connector.ledger import NotificationRecord
from connector.ledger.schema import (
    AddressSuppressionRow,
    AppointmentStateRow,
    CursorRow,
    InboxEventRow,
    LinkRecipientRow,
    NotificationRow,
    OptOutRow,
    RejectionRow,
    SeenVersionRow,
    SubscriptionStateRow,
    WriteBackRow,
)
from connector.models import State

N = NotificationRow.__table__  # type: ignore[attr-defined]
C = CursorRow.__table__  # type: ignore[attr-defined]
S = SeenVersionRow.__table__  # type: ignore[attr-defined]
A = AppointmentStateRow.__table__  # type: ignore[attr-defined]
SUB = SubscriptionStateRow.__table__  # type: ignore[attr-defined]
INBOX = InboxEventRow.__table__  # type: ignore[attr-defined]
REJ = RejectionRow.__table__  # type: ignore[attr-defined]
OPT = OptOutRow.__table__  # type: ignore[attr-defined]
WB = WriteBackRow.__table__  # type: ignore[attr-defined]
SUP = AddressSuppressionRow.__table__  # type: ignore[attr-defined]
LR = LinkRecipientRow.__table__  # type: ignore[attr-defined]
NOTIFIED = (State.SENT.value, State.SENDING.value, State.IN_DOUBT.value)


def make_engine(url: str) -> Engine:
    """An engine for a ledger URL; SQLite gets WAL, full sync and a busy timeout."""
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            create_private(Path(database))  # 0600, whatever the umask; -wal and -shm follow its mode
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # An unreachable server fails a connection within 10 s rather than never (unless the URL says otherwise).
    timeout = {} if "connect_timeout" in make_url(url).query else {"connect_timeout": 10}
    return create_engine(url, pool_pre_ping=True, connect_args=timeout)


def unavailable(exc: BaseException) -> bool:
    """The ledger itself failed (unreachable, locked, out of connections), as opposed to refusing the data it
    was given: the work is abandoned and tried again, nothing is quarantined."""
    return isinstance(exc, OperationalError | InterfaceError | DisconnectionError | PoolTimeout | LedgerError | OSError)


def utcnow() -> datetime:
    return datetime.now(UTC)


def record(row: Any) -> NotificationRecord:
    def aware(value: datetime | None) -> datetime | None:
        return None if value is None else (value if value.tzinfo else value.replace(tzinfo=UTC))

    return NotificationRecord(
        id=row.id,
        key=row.key,
        source=row.source,
        mapping=row.mapping,
        event=row.event,
        resource_type=row.resource_type,
        resource_id=row.resource_id,
        resource_version=row.resource_version,
        patient_id=row.patient_id,
        state=State(row.state),
        reason=row.reason,
        attempts=row.attempts,
        due_at=aware(row.due_at),  # type: ignore[arg-type]
        tracking_id=row.tracking_id,
        updated_at=aware(row.updated_at),  # type: ignore[arg-type]
        appointment_start=aware(row.appointment_start),
        first_attempt_at=aware(row.first_attempt_at),
        resends=row.resends,
        delivery_status=row.delivery_status,
    )


class SqlRole:
    """One role of the ledger over the shared engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    def _insert(self, table: Any) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects import postgresql  # loaded by a PostgreSQL engine anyway; not by SQLite's

            return postgresql.insert(table)
        return sqlite.insert(table)
