"""SqlLedger: the ledger on SQLite (one process, WAL) or PostgreSQL (several processes).

Every method is one short transaction. Duplicates are decided by INSERT … ON CONFLICT DO NOTHING on the
unique key; claims use FOR UPDATE SKIP LOCKED on PostgreSQL (SQLite serialises writers itself).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, String, and_, bindparam, case, create_engine, event, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from connector import optout
from connector.errors import LedgerError
from connector.files import create_private
from connector.ledger import NotificationRecord, SeenVersion, SendResult, Withdrawal
from connector.ledger.optouts import OptOutStore
from connector.ledger.schema import (
    AppointmentStateRow,
    CursorRow,
    InboxEventRow,
    NotificationRow,
    RejectionRow,
    SeenVersionRow,
    SubscriptionStateRow,
)
from connector.lifecycle import Snapshot
from connector.models import PlannedNotification, State

N = NotificationRow.__table__  # type: ignore[attr-defined]
C = CursorRow.__table__  # type: ignore[attr-defined]
S = SeenVersionRow.__table__  # type: ignore[attr-defined]
A = AppointmentStateRow.__table__  # type: ignore[attr-defined]
SUB = SubscriptionStateRow.__table__  # type: ignore[attr-defined]
INBOX = InboxEventRow.__table__  # type: ignore[attr-defined]
REJ = RejectionRow.__table__  # type: ignore[attr-defined]
NOTIFIED = (State.SENT.value, State.SENDING.value, State.IN_DOUBT.value)


# The writes that follow each send, built once (SQLAlchemy caches their compiled form) and run with
# executemany. Bind names differ from column names, as executemany UPDATEs require.
_FINISHING = (N.c.state == State.SENDING.value) | (N.c.state == State.IN_DOUBT.value)
_CONFIRMED = N.c.delivery_rank > 0  # a webhook proved the acceptance while we waited for the answer
_DONE: dict[str, Any] = {"updated_at": bindparam("now"), "lease_owner": None, "lease_until": None}
_FINISH = {
    State.SENT.value: update(N)
    .where(N.c.id == bindparam("nid"), _FINISHING)
    .values(
        state=State.SENT.value,
        reason=bindparam("why"),
        sent_at=bindparam("when"),
        tracking_id=func.coalesce(bindparam("tracking", type_=String), N.c.tracking_id),
        **_DONE,
    ),
    State.FAILED.value: update(N)
    .where(N.c.id == bindparam("nid"), _FINISHING)
    .values(state=State.FAILED.value, reason=bindparam("why"), **_DONE),
    State.IN_DOUBT.value: update(N)
    .where(N.c.id == bindparam("nid"), _FINISHING)
    .values(
        state=case((_CONFIRMED, State.SENT.value), else_=State.IN_DOUBT.value),
        reason=case((_CONFIRMED, "confirmed by a Paubox webhook"), else_=bindparam("why", type_=String)),
        **_DONE,
    ),
    State.PENDING.value: update(N)
    .where(N.c.id == bindparam("nid"), N.c.state == State.SENDING.value)
    .values(
        state=State.PENDING.value,
        due_at=bindparam("due"),
        reason=bindparam("why"),
        attempts=N.c.attempts - bindparam("undo"),
        **_DONE,
    ),
}


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


def _now() -> datetime:
    return datetime.now(UTC)


def _record(row: Any) -> NotificationRecord:
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


class SqlLedger(OptOutStore):
    def __init__(self, engine: Engine, optout_keys: optout.OptOutKeys | None = None) -> None:
        self.engine = engine
        self.optout_keys = optout_keys  # None: the opt-out list can be read (unkeyed rows) but not added to
        self.dialect = engine.dialect.name
        self.single_process = self.dialect == "sqlite"

    def _insert(self, table: Any) -> Any:
        return postgresql.insert(table) if self.dialect == "postgresql" else sqlite.insert(table)

    # -- planning -------------------------------------------------------------------------------------

    def record_page(
        self,
        source: str,
        notifications: Sequence[PlannedNotification],
        seen: Sequence[SeenVersion],
        cursor: datetime | None,
        snapshots: Mapping[str, Snapshot | None] | None = None,
        withdrawals: Sequence[Withdrawal] = (),
    ) -> list[str]:
        with self.engine.begin() as conn:
            for withdrawal in withdrawals:
                self._withdraw(conn, source, withdrawal)
            inserted = self._insert_notifications(conn, notifications)
            self._remember(conn, source, seen)
            self._keep_states(conn, source, snapshots or {})
            if cursor is not None:
                self._advance(conn, source, cursor)
        return inserted

    def add(
        self,
        notifications: Sequence[PlannedNotification],
        source: str | None = None,
        withdrawals: Sequence[Withdrawal] = (),
    ) -> list[str]:
        with self.engine.begin() as conn:
            for withdrawal in withdrawals:
                assert source is not None
                self._withdraw(conn, source, withdrawal)
            return self._insert_notifications(conn, notifications)

    def _withdraw(self, conn: Connection, source: str, withdrawal: Withdrawal) -> None:
        conn.execute(
            update(N)
            .where(
                N.c.source == source,
                N.c.resource_id == withdrawal.appointment_id,
                N.c.patient_id.in_(list(withdrawal.patients)),
                N.c.state == State.PENDING.value,
            )
            .values(
                state=State.CANCELLED.value,
                reason=withdrawal.reason,
                updated_at=_now(),
                lease_owner=None,
                lease_until=None,
            )
        )

    def _keep_states(self, conn: Connection, source: str, snapshots: Mapping[str, Snapshot | None]) -> None:
        now = _now()
        kept = [
            {
                "source": source,
                "appointment_id": appointment_id,
                "status": snap.status,
                "start": snap.start,
                "end": snap.end,
                "version": snap.version,
                "patients": " ".join(snap.patients),
                "last_updated": snap.last_updated,
                "deleted": False,
                "updated_at": now,
            }
            for appointment_id, snap in snapshots.items()
            if snap is not None
        ]
        if kept:
            statement = self._insert(A)
            # A poll and a pushed notification may race: an older version never replaces a newer one.
            newer = (
                A.c.last_updated.is_(None)
                | statement.excluded.last_updated.is_(None)
                | (A.c.last_updated <= statement.excluded.last_updated)
            )
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["source", "appointment_id"],
                    where=newer,
                    set_={
                        name: statement.excluded[name] for name in kept[0] if name not in ("source", "appointment_id")
                    },
                ),
                kept,
            )
        deleted = [
            {"src": source, "aid": appointment_id, "now": now}
            for appointment_id, snap in snapshots.items()
            if snap is None
        ]
        if deleted:
            conn.execute(
                update(A)
                .where(A.c.source == bindparam("src"), A.c.appointment_id == bindparam("aid"))
                .values(deleted=True, updated_at=bindparam("now")),
                deleted,
            )

    def _insert_notifications(self, conn: Connection, notifications: Sequence[PlannedNotification]) -> list[str]:
        notifications = list({n.key: n for n in reversed(notifications)}.values())[::-1]  # one row per key
        if not notifications:
            return []
        now = _now()
        rows = [
            {
                "key": n.key,
                "source": n.source,
                "mapping": n.mapping,
                "event": n.event,
                "resource_type": n.resource_type,
                "resource_id": n.resource_id[:128],
                "resource_version": n.resource_version,
                "patient_id": n.patient_id,
                "state": n.state.value,
                "reason": (n.reason or "")[:500] or None,
                "attempts": 0,
                "due_at": n.due_at,
                "created_at": now,
                "updated_at": now,
                "appointment_start": n.appointment_start,
            }
            for n in notifications
        ]
        statement = self._insert(N)
        # A key that exists stays as it is: the unique constraint decides. The one exception is a
        # notification withdrawn before any attempt to send it (`cancelled`, never started) and planned
        # again, which is re-armed. One cancelled by an operator after it was in doubt stays cancelled.
        statement = statement.on_conflict_do_update(
            index_elements=["key"],
            set_={
                "state": statement.excluded.state,
                "due_at": statement.excluded.due_at,
                "reason": None,
                "attempts": 0,
                "lease_owner": None,
                "lease_until": None,
                "updated_at": now,
                "resource_version": statement.excluded.resource_version,
                "appointment_start": statement.excluded.appointment_start,
            },
            where=(N.c.state == State.CANCELLED.value)
            & N.c.first_attempt_at.is_(None)
            & (statement.excluded.state == State.PENDING.value),
        ).returning(N.c.key)
        return [row.key for row in conn.execute(statement, rows)]

    def _remember(self, conn: Connection, source: str, seen: Sequence[SeenVersion]) -> None:
        if not seen:
            return
        now = _now()
        rows = [
            {
                "source": source,
                "resource_type": s.resource_type,
                "resource_id": s.resource_id,
                "version": s.version,
                "last_updated": s.last_updated,
                "problem": s.problem,
                "seen_at": now,
            }
            for s in seen
        ]
        conn.execute(self._insert(S).on_conflict_do_nothing(), rows)

    def _advance(self, conn: Connection, source: str, cursor: datetime) -> None:
        statement = self._insert(C).values(source=source, value=cursor, updated_at=_now())
        statement = statement.on_conflict_do_update(
            index_elements=["source"],
            set_={"value": statement.excluded.value, "updated_at": statement.excluded.updated_at},
            where=C.c.value < statement.excluded.value,
        )
        conn.execute(statement)

    def new_versions(self, source: str, versions: Sequence[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
        wanted = set(versions)
        if not wanted:
            return set()
        ids = sorted({v[1] for v in wanted})
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(S.c.resource_type, S.c.resource_id, S.c.version).where(
                    S.c.source == source, S.c.resource_id.in_(ids)
                )
            )
            known = {(r.resource_type, r.resource_id, r.version) for r in rows}
        return wanted - known

    def cursor(self, source: str) -> datetime | None:
        with self.engine.connect() as conn:
            value = conn.execute(select(C.c.value).where(C.c.source == source)).scalar_one_or_none()
        return value

    def snapshots(self, source: str, appointment_ids: Sequence[str]) -> dict[str, Snapshot]:
        found: dict[str, Snapshot] = {}
        ids = list(dict.fromkeys(appointment_ids))
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                rows = conn.execute(
                    select(A).where(
                        A.c.source == source, A.c.deleted.is_(False), A.c.appointment_id.in_(ids[start : start + 500])
                    )
                )
                for r in rows:
                    found[r.appointment_id] = Snapshot(
                        r.status, r.start, r.end, r.version, tuple(r.patients.split()), r.last_updated
                    )
        return found

    def window_snapshots(self, source: str, start: datetime, end: datetime) -> dict[str, Snapshot]:
        """Remembered appointments starting in [start, end) that have not ended (for date-window polls)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(A).where(
                    A.c.source == source,
                    A.c.deleted.is_(False),
                    A.c.start >= start,
                    A.c.start < end,
                    A.c.status.not_in(["cancelled", "noshow", "entered-in-error"]),
                )
            )
            return {
                r.appointment_id: Snapshot(
                    r.status, r.start, r.end, r.version, tuple(r.patients.split()), r.last_updated
                )
                for r in rows
            }

    def snapshot(self, source: str, appointment_id: str) -> Snapshot | None:
        """The remembered state, deleted or not (to render a cancellation after a delete)."""
        with self.engine.connect() as conn:
            r = conn.execute(select(A).where(A.c.source == source, A.c.appointment_id == appointment_id)).first()
        if r is None:
            return None
        return Snapshot(r.status, r.start, r.end, r.version, tuple(r.patients.split()), r.last_updated)

    def notified(self, source: str, appointment_ids: Sequence[str]) -> set[tuple[str, str]]:
        ids = list(dict.fromkeys(appointment_ids))
        found: set[tuple[str, str]] = set()
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                rows = conn.execute(
                    select(N.c.resource_id, N.c.patient_id)
                    .distinct()
                    .where(N.c.source == source, N.c.resource_id.in_(ids[start : start + 500]), N.c.state.in_(NOTIFIED))
                )
                found |= {(r.resource_id, r.patient_id) for r in rows}
        return found

    # -- subscriptions --------------------------------------------------------------------------------

    def heard(
        self, source: str, subscription: str, events: int | None, status: str | None, when: datetime
    ) -> int | None:
        """Note a notification; returns the event count known before it (None: never heard of it).
        The stored count only grows."""
        with self.engine.begin() as conn:
            before = conn.execute(
                select(SUB.c.events).where(SUB.c.source == source, SUB.c.subscription == subscription)
            ).scalar()
            values: dict[str, Any] = {"last_seen": when, "status": status}
            if events is not None:
                values["events"] = max(events, before or 0)
            statement = self._insert(SUB).values(
                source=source,
                subscription=subscription,
                events=values.get("events", before or 0),
                status=status,
                last_seen=when,
            )
            conn.execute(statement.on_conflict_do_update(index_elements=["source", "subscription"], set_=values))
        return int(before) if before is not None else None

    def subscriptions(self, source: str) -> list[tuple[str, int, str | None, datetime]]:
        with self.engine.connect() as conn:
            return [
                (r.subscription, r.events, r.status, r.last_seen)
                for r in conn.execute(select(SUB).where(SUB.c.source == source))
            ]

    # -- CRM inbox ------------------------------------------------------------------------------------

    def inbox_add(self, rows: Sequence[dict[str, Any]]) -> int:
        """Store received events; one already there (same source and event id) is left alone. Committed
        before the sender is answered. Returns how many were new."""
        if not rows:
            return 0
        with self.engine.begin() as conn:
            statement = self._insert(INBOX).on_conflict_do_nothing(index_elements=["source", "event_id"])
            return len(list(conn.execute(statement.returning(INBOX.c.id), list(rows))))

    def inbox_pending(self, limit: int) -> list[Any]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(select(INBOX).where(INBOX.c.processed_at.is_(None)).order_by(INBOX.c.id).limit(limit))
            )

    def inbox_window(self, source: str, since: datetime | None, until: datetime | None) -> list[Any]:
        condition = INBOX.c.source == source
        if since is not None:
            condition = and_(condition, INBOX.c.received_at >= since)
        if until is not None:
            condition = and_(condition, INBOX.c.received_at <= until)
        with self.engine.connect() as conn:
            return list(conn.execute(select(INBOX).where(condition).order_by(INBOX.c.id)))

    def inbox_get(self, inbox_id: int) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(INBOX).where(INBOX.c.id == inbox_id)).first()

    def inbox_commit(
        self,
        inbox_ids: Sequence[int],
        notifications: Sequence[PlannedNotification],
        quarantined: Sequence[tuple[str, SeenVersion]] = (),
    ) -> list[str]:
        """Planned notifications and the events they came from, marked processed, in one transaction; events
        that could not be processed are recorded as quarantined ((source, record) pairs)."""
        with self.engine.begin() as conn:
            inserted = self._insert_notifications(conn, notifications)
            for source, seen in quarantined:
                self._remember(conn, source, [seen])
            if inbox_ids:
                conn.execute(update(INBOX).where(INBOX.c.id.in_(list(inbox_ids))).values(processed_at=_now()))
        return inserted

    def inbox_purge(self, received_before: datetime) -> int:
        """Forget processed events older than the retention (their notifications keep their keys)."""
        with self.engine.begin() as conn:
            return conn.execute(
                INBOX.delete().where(INBOX.c.received_at < received_before, INBOX.c.processed_at.is_not(None))
            ).rowcount

    # -- refused requests -----------------------------------------------------------------------------

    def add_rejections(self, counts: Mapping[tuple[str, str], int], when: datetime) -> None:
        if not counts:
            return
        rows = [{"endpoint": e[:80], "reason": r[:100], "total": n, "last_at": when} for (e, r), n in counts.items()]
        statement = self._insert(REJ)
        statement = statement.on_conflict_do_update(
            index_elements=["endpoint", "reason"],
            set_={"total": REJ.c.total + statement.excluded.total, "last_at": statement.excluded.last_at},
        )
        with self.engine.begin() as conn:
            conn.execute(statement, rows)

    def rejections(self) -> list[tuple[str, str, int, datetime]]:
        with self.engine.connect() as conn:
            return [
                (r.endpoint, r.reason, r.total, r.last_at)
                for r in conn.execute(select(REJ).order_by(REJ.c.endpoint, REJ.c.reason))
            ]

    def prune_seen(self, source: str, before: datetime) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(
                S.delete().where(S.c.source == source, S.c.problem.is_(None), S.c.last_updated < before)
            )
        return result.rowcount

    def existing(self, keys: Sequence[str]) -> dict[str, NotificationRecord]:
        found: dict[str, NotificationRecord] = {}
        for start in range(0, len(keys), 500):
            with self.engine.connect() as conn:
                for row in conn.execute(select(N).where(N.c.key.in_(keys[start : start + 500]))):
                    found[row.key] = _record(row)
        return found

    def try_lock_source(self, source: str) -> Connection | bool:
        """Only one process polls a source at a time. PostgreSQL: a session advisory lock, held on the
        returned connection until `unlock_source`; False when another replica holds it. SQLite serves one
        process (see runtime.lock_sqlite): always True."""
        if self.dialect != "postgresql":
            return True
        conn = self.engine.connect()
        # Advisory locks are per database: the schema is part of the key, so that two deployments in two
        # schemas of one database do not wait for each other.
        schema = conn.execute(text("SELECT current_schema()")).scalar()
        key = int.from_bytes(
            hashlib.sha256(f"connector:poll:{schema}:{source}".encode()).digest()[:8], "big", signed=True
        )
        if conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar():
            conn.info["poll_lock"] = key
            conn.commit()
            return conn
        conn.close()
        return False

    def unlock_source(self, handle: Connection | bool) -> None:
        if isinstance(handle, Connection):
            handle.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": handle.info.pop("poll_lock")})
            handle.commit()
            handle.close()

    # -- dispatching ----------------------------------------------------------------------------------

    def claim_due(
        self, now: datetime, limit: int, owner: str, lease_until: datetime, wall_now: datetime, skip: Sequence[int] = ()
    ) -> list[NotificationRecord]:
        """Lease up to `limit` due notifications to `owner`, oldest first; `skip`: ids not wanted now."""
        candidates = (
            select(N.c.id)
            .where(
                N.c.state == State.PENDING.value,
                N.c.due_at <= now,
                or_(N.c.lease_until.is_(None), N.c.lease_until < wall_now),
            )
            .order_by(N.c.due_at, N.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        if skip:
            candidates = candidates.where(N.c.id.not_in(list(skip)))
        statement = (
            update(N)
            .where(N.c.id.in_(candidates.scalar_subquery()))
            .values(lease_owner=owner, lease_until=lease_until)
            .returning(*N.c)
        )
        with self.engine.begin() as conn:
            rows = list(conn.execute(statement))
        return sorted((_record(r) for r in rows), key=lambda r: (r.due_at, r.id))

    def start_sending(self, notification_ids: int | Sequence[int], owner: str, lease_until: datetime) -> set[int]:
        """pending → sending for those still pending and leased by `owner`, in one transaction committed
        before any request leaves. Returns the ids that may be sent now."""
        ids = [notification_ids] if isinstance(notification_ids, int) else list(notification_ids)
        if not ids:
            return set()
        now = _now()
        statement = (
            update(N)
            .where(N.c.id.in_(ids), N.c.state == State.PENDING.value, N.c.lease_owner == owner)
            .values(
                state=State.SENDING.value,
                attempts=N.c.attempts + 1,
                updated_at=now,
                lease_until=lease_until,
                first_attempt_at=func.coalesce(N.c.first_attempt_at, now),
            )
            .returning(N.c.id)
        )
        with self.engine.begin() as conn:
            return set(conn.execute(statement).scalars())

    def finish(self, results: Sequence[SendResult]) -> None:
        """Record how sends ended, all in one transaction (one statement per kind of ending).
        A notification marked in_doubt meanwhile (its lease ran out) still takes what we learnt."""
        groups: dict[str, list[dict[str, Any]]] = {}
        now = _now()
        for r in results:
            params = {"nid": r.notification_id, "now": now, "why": r.reason and r.reason[:500]}
            if r.state is State.SENT:
                params.update(tracking=r.tracking_id, when=r.when or now)
            elif r.state is State.PENDING:
                params.update(due=r.due_at or now, undo=0 if r.count_attempt else 1)
            groups.setdefault(r.state.value, []).append(params)
        if not groups:
            return
        with self.engine.begin() as conn:
            for state, rows in groups.items():
                conn.execute(_FINISH[state], rows)

    def settle(self, notification_id: int, owner: str, state: State, reason: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(N)
                .where(N.c.id == notification_id, N.c.state == State.PENDING.value, N.c.lease_owner == owner)
                .values(state=state.value, reason=reason[:500], updated_at=_now(), lease_owner=None, lease_until=None)
            )

    def prepare_failed(self, notification_id: int, owner: str, reason: str, due_at: datetime | None) -> None:
        """Preparing a leased notification crashed: one attempt spent, then pending again at `due_at`, or
        `failed` when `due_at` is None (the attempts or the age are used up)."""
        now = _now()
        values: dict[str, Any] = {
            "attempts": N.c.attempts + 1,
            "reason": reason[:500],
            "updated_at": now,
            "first_attempt_at": func.coalesce(N.c.first_attempt_at, now),
            "lease_owner": None,
            "lease_until": None,
        }
        if due_at is None:
            values["state"] = State.FAILED.value
        else:
            values["due_at"] = due_at
        with self.engine.begin() as conn:
            conn.execute(
                update(N)
                .where(N.c.id == notification_id, N.c.state == State.PENDING.value, N.c.lease_owner == owner)
                .values(**values)
            )

    def release(self, owner: str | None, notification_ids: Sequence[int] | None = None) -> int:
        condition = N.c.state == State.PENDING.value
        condition = and_(condition, N.c.lease_owner.is_not(None) if owner is None else N.c.lease_owner == owner)
        if notification_ids is not None:
            condition = and_(condition, N.c.id.in_(list(notification_ids)))
        with self.engine.begin() as conn:
            return conn.execute(update(N).where(condition).values(lease_owner=None, lease_until=None)).rowcount

    def mark_interrupted(self, wall_now: datetime, everything: bool) -> int:
        condition = N.c.state == State.SENDING.value
        if not everything:
            condition = and_(condition, or_(N.c.lease_until.is_(None), N.c.lease_until < wall_now))
        reason = "interrupted while sending: Paubox may or may not have accepted it"
        with self.engine.begin() as conn:
            result = conn.execute(
                update(N)
                .where(condition)
                .values(
                    state=case((N.c.delivery_rank > 0, State.SENT.value), else_=State.IN_DOUBT.value),
                    reason=case((N.c.delivery_rank > 0, "confirmed by a Paubox webhook"), else_=reason),
                    updated_at=_now(),
                    lease_owner=None,
                    lease_until=None,
                )
            )
        return result.rowcount

    # -- after sending: webhooks, receipts, doubt ----------------------------------------------------

    def confirm(self, key: str, tracking_id: str | None, reason: str) -> bool:
        """Paubox has the message (a webhook named its key): in_doubt → sent. True when it was in doubt."""
        values: dict[str, Any] = {"state": State.SENT.value, "reason": reason, "updated_at": _now(), "sent_at": _now()}
        if tracking_id:
            values["tracking_id"] = tracking_id[:128]
        doubtful = (N.c.state == State.IN_DOUBT.value) | ((N.c.state == State.PENDING.value) & (N.c.resends > 0))
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(N).where(N.c.key == key, doubtful).values(**values, lease_owner=None, lease_until=None)
                ).rowcount
            )

    def record_delivery(self, key: str | None, tracking_id: str | None, status: str, rank: int, when: datetime) -> bool:
        """Store a delivery status unless a stronger one is already there (repeats and late events are
        harmless). Matched by key, else by Paubox tracking id."""
        if key:
            where = N.c.key == key
        elif tracking_id:
            where = N.c.tracking_id == tracking_id
        else:
            return False
        values: dict[str, Any] = {"delivery_status": status, "delivery_rank": rank, "delivery_updated_at": when}
        if key and tracking_id:
            values["tracking_id"] = func.coalesce(N.c.tracking_id, tracking_id[:128])
        with self.engine.begin() as conn:
            return bool(conn.execute(update(N).where(where, N.c.delivery_rank < rank).values(**values)).rowcount)

    def awaiting_receipt(self, sent_before: datetime, limit: int) -> list[NotificationRecord]:
        """Sent notifications with a tracking id and no delivery status yet."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(N)
                .where(
                    N.c.state == State.SENT.value,
                    N.c.tracking_id.is_not(None),
                    N.c.delivery_rank == 0,
                    N.c.sent_at < sent_before,
                )
                .order_by(N.c.sent_at)
                .limit(limit)
            )
            return [_record(r) for r in rows]

    def overdue_in_doubt(self, updated_before: datetime, limit: int) -> list[NotificationRecord]:
        """In-doubt notifications nobody has confirmed since `updated_before` and not yet handled."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(N)
                .where(N.c.state == State.IN_DOUBT.value, N.c.alerted_at.is_(None), N.c.updated_at < updated_before)
                .order_by(N.c.id)
                .limit(limit)
            )
            return [_record(r) for r in rows]

    def mark_alerted(self, notification_ids: Sequence[int]) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(N).where(N.c.id.in_(list(notification_ids))).values(alerted_at=_now()))

    def resend(
        self,
        notification_id: int,
        due_at: datetime,
        reason: str,
        from_states: Sequence[State],
        first_only: bool = False,
    ) -> bool:
        """A deliberate second send of the same key (same X-Notification-Key): → pending, resends + 1.
        `first_only`: only if it was never resent (the `resend` policy sends one more copy at most)."""
        condition = and_(
            N.c.id == notification_id, N.c.state.in_([s.value for s in from_states]), N.c.delivery_rank == 0
        )
        if first_only:
            condition = and_(condition, N.c.resends == 0)
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(N)
                    .where(condition)
                    .values(
                        state=State.PENDING.value,
                        due_at=due_at,
                        reason=reason[:500],
                        resends=N.c.resends + 1,
                        attempts=0,
                        first_attempt_at=None,
                        alerted_at=None,
                        lease_owner=None,
                        lease_until=None,
                        updated_at=_now(),
                    )
                ).rowcount
            )

    def resolve(self, key: str, state: State, reason: str, from_states: Sequence[State]) -> bool:
        """An operator's decision on a notification (in_doubt → sent or cancelled, ...)."""
        values: dict[str, Any] = {"state": state.value, "reason": reason[:500], "updated_at": _now()}
        if state is State.SENT:
            values["sent_at"] = _now()
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(N).where(N.c.key == key, N.c.state.in_([s.value for s in from_states])).values(**values)
                ).rowcount
            )

    # -- reporting ------------------------------------------------------------------------------------

    def counts(self) -> dict[State, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(N.c.state, func.count()).group_by(N.c.state))
            found = {State(state): count for state, count in rows}
        return {state: found.get(state, 0) for state in State}

    def notifications(self, states: Sequence[State], limit: int) -> list[NotificationRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(N)
                .where(N.c.state.in_([s.value for s in states]))
                .order_by(N.c.updated_at.desc(), N.c.id.desc())
                .limit(limit)
            )
            return [_record(r) for r in rows]

    def due(self, now: datetime, limit: int) -> list[NotificationRecord]:
        """Pending notifications due at `now` (read-only; for dry runs)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(N)
                .where(N.c.state == State.PENDING.value, N.c.due_at <= now)
                .order_by(N.c.due_at, N.c.id)
                .limit(limit)
            )
            return [_record(r) for r in rows]

    def quarantined(self) -> dict[str, int]:
        """How many resource versions and events are quarantined, per source."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(S.c.source, func.count()).where(S.c.problem.is_not(None)).group_by(S.c.source))
            return {source: count for source, count in rows}

    def problems(self, limit: int) -> list[tuple[str, SeenVersion]]:
        """The latest quarantined resource versions and events, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(S).where(S.c.problem.is_not(None)).order_by(S.c.seen_at.desc()).limit(limit))
            return [
                (r.source, SeenVersion(r.resource_type, r.resource_id, r.version, r.last_updated, r.problem, r.seen_at))
                for r in rows
            ]

    def cursors(self) -> dict[str, datetime]:
        with self.engine.connect() as conn:
            return {r.source: r.value for r in conn.execute(select(C))}
