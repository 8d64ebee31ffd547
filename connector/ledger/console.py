"""The console role: what the operator console reads (searches newest first by keyset, one notification
with its journal and audit entries, one appointment with what intake saw of it, chart buckets) and the
actions a person takes on notifications: these go through the operator role (connector.ledger.operator),
the same settle and requeue as `connector resolve` and `connector retry`, audited in the same table. And the
console sessions signed out (revision 0015), which every process serving the console refuses.

Every search is ordered by id, newest first, and pages by `before` (the last id shown): with the indexes
of revision 0011 a page reads only its own rows, however large the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import delete, func, literal_column, select
from sqlalchemy.engine import Engine
from sqlalchemy.sql.elements import ColumnElement

from connector.ledger.engine import A, N, S, SqlRole, record, utcnow
from connector.ledger.journal import Event, SqlJournal
from connector.ledger.operator import Audit, AuditEntry, Selection, SqlOperator
from connector.ledger.schema import ConsoleSignOutRow
from connector.models import State

if TYPE_CHECKING:
    from connector.ledger import NotificationRecord

SIGNOUT = ConsoleSignOutRow.__table__  # type: ignore[attr-defined]

Action = Literal["resolve-sent", "resolve-resend", "resolve-cancel", "retry"]
ACTIONS: dict[str, tuple[tuple[State, ...], State]] = {  # action: (states it applies to, the state it leaves)
    "resolve-sent": ((State.IN_DOUBT,), State.SENT),
    "resolve-resend": ((State.IN_DOUBT,), State.PENDING),
    "resolve-cancel": ((State.IN_DOUBT,), State.CANCELLED),
    "retry": ((State.FAILED,), State.PENDING),
}
MAX_BULK = 1000  # notifications one action by filter may change
NOTES = {  # what the notifications' own reason becomes (the person's reason is in the audit trail)
    "resolve-sent": "resolved by an operator: it was sent",
    "resolve-resend": "resend ordered by an operator",
    "resolve-cancel": "resolved by an operator: cancelled",
    "retry": "retry ordered by an operator",
}


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

    def selection(self, states: Sequence[State]) -> Selection:
        """The same filter as an operator Selection, limited to `states` when it names no state."""
        return Selection(
            keys=(self.key,) if self.key else (),
            states=(self.state,) if self.state is not None else tuple(states),
            mappings=(self.mapping,) if self.mapping else (),
            sources=(self.source,) if self.source else (),
            appointments=(self.appointment_id,) if self.appointment_id else (),
            patients=(self.patient_id,) if self.patient_id else (),
            due_since=self.since,
            due_until=self.until,
        )

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
class Detail:
    """One notification with the times its row keeps, its journal (what happened, oldest first) and its
    audit entries (what people did, from the CLI or the console)."""

    record: NotificationRecord
    created_at: datetime
    sent_at: datetime | None
    delivery_updated_at: datetime | None
    alerted_at: datetime | None
    audit: list[AuditEntry]
    journal: list[Event]


@dataclass(frozen=True)
class Bucket:
    start: str  # "YYYY-MM-DD HH" or "YYYY-MM-DD" (UTC)
    state: str
    count: int


class SqlConsole(SqlRole):
    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.operator = SqlOperator(engine)
        self.journal = SqlJournal(engine)

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
        return Detail(
            record(row),
            _opt(row.created_at) or utcnow(),
            _opt(row.sent_at),
            _opt(row.delivery_updated_at),
            _opt(row.alerted_at),
            self.operator.history(notification_id),
            self.journal.of_notification(notification_id),
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
        it applies to, through the operator role (one transaction with its audit rows). Returns how many
        changed; the request is audited even when none did (someone asked)."""
        from_states, to_state = ACTIONS[action]
        if notification_id is not None:
            selection, scope = Selection(ids=(notification_id,)), f"notification {notification_id}"
        else:
            assert search is not None
            selection, scope = search.selection(from_states), search.describe()
        audit = Audit(actor, reason, role, action, scope, f"{NOTES[action]} (console, {actor[:64]})", MAX_BULK)
        if to_state is State.PENDING:
            changed = self.operator.requeue(selection, utcnow(), from_states, audit)
        else:
            changed = self.operator.settle(selection, to_state, from_states, audit)
        return len(changed.ids)

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
        return self.operator.record(actor, role, action, reason, notification_id, scope)

    def sign_out(self, session: str, until: datetime, now: datetime) -> None:
        """Record that the console session `session` (a digest, connector.web.console.auth) is signed out, for
        every process, until `until`; sign-outs already past their `until` are forgotten."""
        with self.engine.begin() as conn:
            conn.execute(delete(SIGNOUT).where(SIGNOUT.c.until < now))
            conn.execute(self._insert(SIGNOUT).values(session=session, until=until).on_conflict_do_nothing())

    def signed_out(self, session: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(SIGNOUT.c.session).where(SIGNOUT.c.session == session)).first() is not None

    def audit_log(self, before: int | None, limit: int) -> list[AuditEntry]:
        """The one audit trail (CLI and console), newest first."""
        return self.operator.log(before, limit)

    def _truncate(self, column: Any, unit: str) -> Any:
        if self.dialect == "postgresql":
            return func.to_char(func.date_trunc(unit, column), "YYYY-MM-DD HH24" if unit == "hour" else "YYYY-MM-DD")
        return func.strftime(literal_column("'%Y-%m-%d %H'" if unit == "hour" else "'%Y-%m-%d'"), column)


def _opt(value: datetime | None) -> datetime | None:
    return None if value is None else value if value.tzinfo else value.replace(tzinfo=UTC)
