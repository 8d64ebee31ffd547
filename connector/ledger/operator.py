"""The operator role: what a person selects in the ledger and does to it, from the CLI (`connector resolve`,
`connector retry`) and the operator console alike, and the one audit trail both write (table `audit`).

A `Selection` names notifications by id or key and/or by filter (states, mappings, sources, appointment
and patient ids, a window on when they last changed or on when they are due); every criterion given must
hold. `page` lists a selection a page at a time (keyset on the id: no OFFSET, stable while rows change),
`count` counts it per state. `settle` (→ sent or cancelled) and `requeue` (→ pending, sent again under
the same key) change every selected notification that is in one of the states the action applies to, in
one transaction with their audit rows: one per notification changed (who, as which role, when, which
action, from which state to which, the reason), and, when the caller describes a `scope` (an action by
filter, or a console action that should be recorded even when it changes nothing), one row for the request
itself. `record` audits what changes no notification (a preview, a replay); `log` and `history` read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, insert, select, update

from connector.ledger.engine import N, SqlRole, record, utcnow
from connector.ledger.schema import AuditRow
from connector.models import State

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement

    from connector.ledger import NotificationRecord

ACT = AuditRow.__table__  # type: ignore[attr-defined]
SETTLED = (State.SENT, State.CANCELLED)  # what `settle` may set
CHUNK = 500  # ids per IN (...) list


@dataclass(frozen=True)
class Selection:
    """Which notifications: by id or key, and/or by filter. Empty tuples and None mean "any"; an empty
    Selection selects nothing (acting on the whole ledger by mistake is not possible)."""

    ids: tuple[int, ...] = ()
    keys: tuple[str, ...] = ()
    states: tuple[State, ...] = ()
    mappings: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    since: datetime | None = None  # last changed at or after
    until: datetime | None = None  # last changed before
    appointments: tuple[str, ...] = ()  # resource ids
    patients: tuple[str, ...] = ()
    due_since: datetime | None = None  # due at or after
    due_until: datetime | None = None  # due before

    @property
    def empty(self) -> bool:
        return not (
            self.ids
            or self.keys
            or self.states
            or self.mappings
            or self.sources
            or self.since
            or self.until
            or self.appointments
            or self.patients
            or self.due_since
            or self.due_until
        )

    @property
    def by_name(self) -> bool:
        """Names its notifications one by one (ids or keys) rather than by filter only."""
        return bool(self.ids or self.keys)

    def where(self, states: Sequence[State] = ()) -> ColumnElement[bool]:
        """The SQL condition; `states`: also in one of these (the states an action applies to)."""
        conditions: list[Any] = []
        if self.empty:
            conditions.append(N.c.id.is_(None))  # never true
        if self.ids or self.keys:
            named = []
            if self.ids:
                named.append(N.c.id.in_(self.ids))
            if self.keys:
                named.append(N.c.key.in_(self.keys))
            conditions.append(named[0] if len(named) == 1 else named[0] | named[1])
        wanted = [s.value for s in self.states]
        if states:
            allowed = {s.value for s in states}
            wanted = [s for s in wanted if s in allowed] if wanted else sorted(allowed)
            if not wanted:
                conditions.append(N.c.id.is_(None))
        if wanted:
            conditions.append(N.c.state.in_(wanted))
        if self.mappings:
            conditions.append(N.c.mapping.in_(self.mappings))
        if self.sources:
            conditions.append(N.c.source.in_(self.sources))
        for column, values in ((N.c.resource_id, self.appointments), (N.c.patient_id, self.patients)):
            if values:
                conditions.append(column.in_(values))
        for column, since, until in (
            (N.c.updated_at, self.since, self.until),
            (N.c.due_at, self.due_since, self.due_until),
        ):
            if since is not None:
                conditions.append(column >= since)
            if until is not None:
                conditions.append(column < until)
        return and_(*conditions)


@dataclass(frozen=True)
class Changed:
    """What an action did: the ids changed, per state they were in before."""

    action: str
    to_state: State
    ids: tuple[int, ...]
    by_state: dict[State, int]


@dataclass(frozen=True)
class AuditEntry:
    """One row of the audit trail: a change to one notification (`from_state` → `to_state`), a request by
    filter (`scope`, `count` changed), or something that changed nothing (a preview, a replay)."""

    id: int
    at: datetime
    actor: str
    role: str
    action: str
    notification_id: int | None
    from_state: State | None
    to_state: State | None
    scope: str | None
    count: int
    reason: str


@dataclass(frozen=True)
class Audit:
    """Who asks, and how the request is recorded: `action` names it in the audit trail, `scope` (a filter in
    words, or any description) adds a row for the request itself even when nothing changes, `note` is
    what the notifications' own reason becomes (by default the reason given), `limit` caps how many change."""

    actor: str
    reason: str
    role: str = "cli"
    action: str | None = None
    scope: str | None = None
    note: str | None = None
    limit: int | None = None


class SqlOperator(SqlRole):
    def count(self, selection: Selection, states: Sequence[State] = ()) -> dict[State, int]:
        """How many notifications the selection holds, per state (only those with a non-zero count)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(N.c.state, func.count()).where(selection.where(states)).group_by(N.c.state))
            return {State(state): total for state, total in rows}

    def page(
        self, selection: Selection, after: int | None, limit: int, states: Sequence[State] = ()
    ) -> list[NotificationRecord]:
        """Up to `limit` selected notifications with an id above `after`, by id (pass the last id back)."""
        condition = selection.where(states)
        if after is not None:
            condition = and_(condition, N.c.id > after)
        with self.engine.connect() as conn:
            return [record(r) for r in conn.execute(select(N).where(condition).order_by(N.c.id).limit(limit))]

    def settle(
        self,
        selection: Selection,
        to_state: State,
        from_states: Sequence[State],
        actor: str | Audit,
        reason: str = "",
    ) -> Changed:
        """The selected notifications in `from_states` → `to_state` (sent or cancelled), in one transaction.
        `actor`: who (the CLI's account, with `reason`), or an Audit that says more."""
        if to_state not in SETTLED:
            raise ValueError(f"settle sets sent or cancelled, not {to_state.value}")
        audit = actor if isinstance(actor, Audit) else Audit(actor, reason)
        if audit.action is None:
            audit = replace(audit, action="resolve-sent" if to_state is State.SENT else "resolve-cancel")
        now = utcnow()
        values: dict[str, Any] = {
            "state": to_state.value,
            "reason": (audit.note or audit.reason)[:500],
            "updated_at": now,
            "lease_owner": None,
            "lease_until": None,
        }
        if to_state is State.SENT:
            values["sent_at"] = now
        return self._act(selection, from_states, to_state, values, audit, now)

    def requeue(
        self,
        selection: Selection,
        due_at: datetime,
        from_states: Sequence[State],
        actor: str | Audit,
        reason: str = "",
    ) -> Changed:
        """The selected notifications in `from_states` → pending at `due_at`, to be sent again under the same
        key (attempts start again; resends + 1). One whose delivery Paubox has reported is left alone.
        Audited as `resolve-resend` (from in_doubt) or `retry` (from failed) unless the Audit names it."""
        audit = actor if isinstance(actor, Audit) else Audit(actor, reason)
        now = utcnow()
        values: dict[str, Any] = {
            "state": State.PENDING.value,
            "due_at": due_at,
            "reason": (audit.note or audit.reason)[:500],
            "resends": N.c.resends + 1,
            "attempts": 0,
            "first_attempt_at": None,
            "alerted_at": None,
            "lease_owner": None,
            "lease_until": None,
            "updated_at": now,
        }
        return self._act(selection, from_states, State.PENDING, values, audit, now)

    def record(
        self,
        actor: str,
        role: str,
        action: str,
        reason: str,
        notification_id: int | None = None,
        scope: str | None = None,
    ) -> int:
        """Audit something a person did that changes no notification (a preview, a replay); returns its id."""
        row = _row(Audit(actor, reason, role, action, scope), utcnow(), notification_id, count=0)
        row["scope"] = None if scope is None else scope[:500]
        with self.engine.begin() as conn:
            return int(conn.execute(insert(ACT).values(**row).returning(ACT.c.id)).scalar_one())

    def history(self, notification_id: int) -> list[AuditEntry]:
        """What people did to one notification (CLI and console), oldest first."""
        return self._read(ACT.c.notification_id == notification_id, ACT.c.id, None)

    def log(self, before: int | None, limit: int) -> list[AuditEntry]:
        """The whole audit trail, newest first, a page at a time (ids below `before`)."""
        return self._read(True if before is None else ACT.c.id < before, ACT.c.id.desc(), limit)

    def _read(self, condition: Any, order: Any, limit: int | None) -> list[AuditEntry]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(ACT).where(condition).order_by(order).limit(limit))
            return [
                AuditEntry(
                    r.id,
                    r.at,
                    r.actor,
                    r.role,
                    r.action,
                    r.notification_id,
                    None if r.from_state is None else State(r.from_state),
                    None if r.to_state is None else State(r.to_state),
                    r.scope,
                    r._mapping["count"],
                    r.reason,
                )
                for r in rows
            ]

    def _act(
        self,
        selection: Selection,
        from_states: Sequence[State],
        to_state: State,
        values: dict[str, Any],
        audit: Audit,
        now: datetime,
    ) -> Changed:
        condition = selection.where(from_states)
        if to_state is State.PENDING:
            condition = and_(condition, N.c.delivery_rank == 0)
        with self.engine.begin() as conn:
            query = select(N.c.id, N.c.state).where(condition).order_by(N.c.id).limit(audit.limit)
            if self.dialect == "postgresql":
                query = query.with_for_update(skip_locked=True)  # one a dispatcher holds now is left alone
            before = {row.id: State(row.state) for row in conn.execute(query)}
            ids = list(before)
            changed: list[int] = []
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                result = conn.execute(update(N).where(N.c.id.in_(chunk), condition).values(**values).returning(N.c.id))
                changed += [row.id for row in result]
            rows = [_row(audit, now, i, before[i], to_state, count=1, action=_named(audit, before[i])) for i in changed]
            if audit.scope is not None:  # the request itself, recorded even when it changed nothing
                only = selection.ids[0] if len(selection.ids) == 1 and not selection.keys else None
                if only is not None and rows:
                    rows[0]["scope"] = audit.scope[:500]  # one notification: its row says it all
                else:
                    rows.insert(0, _row(audit, now, only, count=len(changed), action=_named(audit, None)))
                    rows[0]["scope"] = audit.scope[:500]
            if rows:
                conn.execute(insert(ACT), rows)
        by_state: dict[State, int] = {}
        for i in changed:
            by_state[before[i]] = by_state.get(before[i], 0) + 1
        return Changed(_named(audit, None), to_state, tuple(sorted(changed)), by_state)


def _named(audit: Audit, from_state: State | None) -> str:
    if audit.action is not None:
        return audit.action
    return "resolve-resend" if from_state is State.IN_DOUBT else "retry"


def _row(
    audit: Audit,
    now: datetime,
    notification_id: int | None,
    from_state: State | None = None,
    to_state: State | None = None,
    *,
    count: int,
    action: str | None = None,
) -> dict[str, Any]:
    return {
        "at": now,
        "actor": audit.actor[:64],
        "role": audit.role[:16],
        "action": (action or audit.action or "")[:32],
        "notification_id": notification_id,
        "from_state": None if from_state is None else from_state.value,
        "to_state": None if to_state is None else to_state.value,
        "scope": None,
        "count": count,
        "reason": audit.reason[:500],
    }
