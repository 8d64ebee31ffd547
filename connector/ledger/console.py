"""The console role: what the operator console reads (searches newest first by keyset, one notification,
one appointment, chart buckets) and the actions a person takes on notifications, each in the same
transaction as its audit entry (connector.ledger.schema.AuditRow).

Every search is ordered by id, newest first, and pages by `before` (the last id shown): with the indexes
of revision 0011 a page reads only its own rows, however large the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import and_, func, insert, literal_column, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from connector.ledger.engine import A, N, S, SqlRole, record, utcnow
from connector.ledger.schema import AuditRow
from connector.models import State

if TYPE_CHECKING:
    from connector.ledger import NotificationRecord

AUDIT = AuditRow.__table__  # type: ignore[attr-defined]
Action = Literal["resolve-sent", "resolve-resend", "resolve-cancel", "retry"]
ACTIONS: dict[str, tuple[tuple[State, ...], State]] = {  # action: (states it applies to, the state it leaves)
    "resolve-sent": ((State.IN_DOUBT,), State.SENT),
    "resolve-resend": ((State.IN_DOUBT,), State.PENDING),
    "resolve-cancel": ((State.IN_DOUBT,), State.CANCELLED),
    "retry": ((State.FAILED,), State.PENDING),
}
MAX_BULK = 1000  # notifications one action by filter may change


@dataclass(frozen=True)
class Search:
    """What the notifications page filters on; every field optional. `since`/`until` bound the due time."""

    appointment_id: str | None = None
    patient_id: str | None = None
    key: str | None = None
    state: State | None = None
    mapping: str | None = None
    source: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        found: list[ColumnElement[bool]] = []
        for column, value in (
            (N.c.resource_id, self.appointment_id),
            (N.c.patient_id, self.patient_id),
            (N.c.key, self.key),
            (N.c.mapping, self.mapping),
            (N.c.source, self.source),
        ):
            if value:
                found.append(column == value)
        if self.state is not None:
            found.append(N.c.state == self.state.value)
        if self.since is not None:
            found.append(N.c.due_at >= self.since)
        if self.until is not None:
            found.append(N.c.due_at < self.until)
        return found

    def describe(self) -> str:
        """The filter in words for the audit table: names of fields and states, times; no ids of patients."""
        parts = [f"{name} given" for name in ("appointment_id", "patient_id", "key") if getattr(self, name)]
        parts += [f"{name}={getattr(self, name)}" for name in ("mapping", "source") if getattr(self, name)]
        if self.state is not None:
            parts.append(f"state={self.state.value}")
        if self.since is not None:
            parts.append(f"due>={self.since.isoformat()}")
        if self.until is not None:
            parts.append(f"due<{self.until.isoformat()}")
        return ", ".join(parts) or "every notification"


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    role: str
    action: str
    notification_id: int | None
    scope: str | None
    count: int
    reason: str


@dataclass(frozen=True)
class Detail:
    """One notification with the times its row keeps (for the timeline) and its audit entries."""

    record: NotificationRecord
    created_at: datetime
    sent_at: datetime | None
    delivery_updated_at: datetime | None
    alerted_at: datetime | None
    audit: list[AuditEntry]


@dataclass(frozen=True)
class Bucket:
    start: str  # "YYYY-MM-DD HH" or "YYYY-MM-DD" (UTC)
    state: str
    count: int


class SqlConsole(SqlRole):
    def search(self, search: Search, before: int | None, limit: int) -> list[NotificationRecord]:
        """A page of notifications matching `search`, newest first, with ids below `before`."""
        conditions = search.conditions()
        if before is not None:
            conditions.append(N.c.id < before)
        with self.engine.connect() as conn:
            rows = conn.execute(select(N).where(*conditions).order_by(N.c.id.desc()).limit(limit))
            return [record(r) for r in rows]

    def detail(self, notification_id: int) -> Detail | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(N).where(N.c.id == notification_id)).first()
            if row is None:
                return None
            audit = conn.execute(
                select(AUDIT).where(AUDIT.c.notification_id == notification_id).order_by(AUDIT.c.id)
            ).all()
        return Detail(
            record(row),
            _opt(row.created_at) or utcnow(),
            _opt(row.sent_at),
            _opt(row.delivery_updated_at),
            _opt(row.alerted_at),
            [_entry(a) for a in audit],
        )

    def appointment(self, appointment_id: str, limit: int = 500) -> tuple[list[NotificationRecord], list[Any]]:
        """Everything planned for one appointment (every source and mapping), and what the connector saw of it:
        the remembered states and the versions recorded (with their problems), oldest first."""
        with self.engine.connect() as conn:
            notes = conn.execute(select(N).where(N.c.resource_id == appointment_id).order_by(N.c.id).limit(limit))
            records = [record(r) for r in notes]
            states = conn.execute(select(A).where(A.c.appointment_id == appointment_id)).all()
            versions = conn.execute(
                select(S)
                .where(S.c.resource_type == "Appointment", S.c.resource_id == appointment_id)
                .order_by(S.c.seen_at)
                .limit(limit)
            ).all()
        return records, [*states, *versions]

    def oldest_due(self) -> datetime | None:
        """The due time of the oldest pending notification (on the (state, due_at) index)."""
        with self.engine.connect() as conn:
            value = conn.execute(select(func.min(N.c.due_at)).where(N.c.state == State.PENDING.value)).scalar()
        return _opt(value)

    def buckets(self, since: datetime, unit: Literal["hour", "day"]) -> list[Bucket]:
        """How many notifications reached each state, per hour or day since `since` (by when they last
        changed: the state they are in now)."""
        start = self._truncate(N.c.updated_at, unit).label("start")
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(start, N.c.state, func.count())
                .where(N.c.updated_at >= since, N.c.state != State.PENDING.value)
                .group_by(start, N.c.state)
            ).all()
        return [Bucket(str(s)[: 13 if unit == "hour" else 10], state, count) for s, state, count in rows]

    def skipped_reasons(self, since: datetime, limit: int = 10) -> list[tuple[str, int]]:
        """Why notifications were skipped or cancelled since `since`, most frequent first."""
        total = func.count().label("total")
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(N.c.reason, total)
                .where(N.c.updated_at >= since, N.c.state.in_([State.SKIPPED.value, State.CANCELLED.value]))
                .group_by(N.c.reason)
                .order_by(total.desc())
                .limit(limit)
            ).all()
        return [(reason or "(no reason)", count) for reason, count in rows]

    def act(
        self,
        action: Action,
        actor: str,
        role: str,
        reason: str,
        *,
        notification_id: int | None = None,
        search: Search | None = None,
    ) -> int:
        """Apply `action` to one notification or to those `search` finds (at most MAX_BULK) that are in a state
        it applies to, and record it in the audit table in the same transaction. Returns how many changed
        (the audit entry is written even when none did: someone asked)."""
        from_states, to_state = ACTIONS[action]
        now = utcnow()
        condition = N.c.state.in_([s.value for s in from_states])
        if notification_id is not None:
            condition = and_(condition, N.c.id == notification_id)
        else:
            assert search is not None
            condition = and_(condition, *search.conditions())
        with self.engine.begin() as conn:
            ids = [r.id for r in conn.execute(select(N.c.id).where(condition).order_by(N.c.id).limit(MAX_BULK))]
            audit_id = self._audit(
                conn,
                actor,
                role,
                action,
                reason,
                notification_id,
                None if search is None else search.describe(),
                0,
                now,
            )
            changed = self._apply(conn, ids, from_states, to_state, audit_id, now) if ids else 0
            conn.execute(update(AUDIT).where(AUDIT.c.id == audit_id).values(count=changed))
            if notification_id is None and changed:  # one entry per notification, for its timeline
                conn.execute(
                    insert(AUDIT),
                    [
                        {
                            "at": now,
                            "actor": actor,
                            "role": role,
                            "action": action,
                            "notification_id": i,
                            "scope": f"by filter (audit #{audit_id})",
                            "count": 1,
                            "reason": reason[:500],
                        }
                        for i in ids
                    ],
                )
        return changed

    def audit(
        self,
        actor: str,
        role: str,
        action: str,
        reason: str,
        notification_id: int | None = None,
        scope: str | None = None,
    ) -> int:
        """Record something a person did that changes no notification (a preview, a replay)."""
        with self.engine.begin() as conn:
            return self._audit(conn, actor, role, action, reason, notification_id, scope, 0, utcnow())

    def audit_log(self, before: int | None, limit: int) -> list[AuditEntry]:
        condition = [] if before is None else [AUDIT.c.id < before]
        with self.engine.connect() as conn:
            rows = conn.execute(select(AUDIT).where(*condition).order_by(AUDIT.c.id.desc()).limit(limit))
            return [_entry(r) for r in rows]

    def _apply(
        self,
        conn: Connection,
        ids: Sequence[int],
        from_states: Sequence[State],
        to: State,
        audit_id: int,
        now: datetime,
    ) -> int:
        note = f"by an operator (console audit #{audit_id})"
        values: dict[str, Any] = {"state": to.value, "updated_at": now, "lease_owner": None, "lease_until": None}
        condition = and_(N.c.id.in_(list(ids)), N.c.state.in_([s.value for s in from_states]))
        if to is State.SENT:
            values.update(sent_at=now, reason=f"resolved as sent {note}")
        elif to is State.CANCELLED:
            values.update(reason=f"cancelled {note}")
        else:  # back to pending: a deliberate resend (in doubt) or another try (failed), due now
            values.update(
                due_at=now,
                reason=f"requeued {note}",
                attempts=0,
                first_attempt_at=None,
                alerted_at=None,
                resends=N.c.resends + (1 if State.IN_DOUBT in from_states else 0),
            )
            if State.IN_DOUBT in from_states:  # a message Paubox reported on was sent: never again
                condition = and_(condition, N.c.delivery_rank == 0)
        return int(conn.execute(update(N).where(condition).values(**values)).rowcount)

    def _audit(
        self,
        conn: Connection,
        actor: str,
        role: str,
        action: str,
        reason: str,
        notification_id: int | None,
        scope: str | None,
        count: int,
        now: datetime,
    ) -> int:
        row = {
            "at": now,
            "actor": actor[:64],
            "role": role,
            "action": action,
            "notification_id": notification_id,
            "scope": None if scope is None else scope[:500],
            "count": count,
            "reason": reason[:500],
        }
        return int(conn.execute(insert(AUDIT).values(**row).returning(AUDIT.c.id)).scalar_one())

    def _truncate(self, column: Any, unit: str) -> Any:
        if self.dialect == "postgresql":
            return func.to_char(func.date_trunc(unit, column), "YYYY-MM-DD HH24" if unit == "hour" else "YYYY-MM-DD")
        return func.strftime(literal_column("'%Y-%m-%d %H'" if unit == "hour" else "'%Y-%m-%d'"), column)


def _opt(value: datetime | None) -> datetime | None:
    return None if value is None else value if value.tzinfo else value.replace(tzinfo=UTC)


def _entry(row: Any) -> AuditEntry:
    return AuditEntry(
        row.id,
        _opt(row.at) or utcnow(),
        row.actor,
        row.role,
        row.action,
        row.notification_id,
        row.scope,
        row.count,
        row.reason,
    )
