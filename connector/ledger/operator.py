"""The operator role: what a person selects in the ledger and does to it (`connector resolve`, `connector
retry`, the operator console).

A `Selection` names notifications by id or key and/or by filter (states, mappings, sources, a window on
when they last changed); every criterion given must hold. `page` lists a selection a page at a time
(keyset on the id: no OFFSET, stable while rows change), `count` counts it per state. `settle` (→ sent or
cancelled) and `requeue` (→ pending, sent again under the same key) change every selected notification
that is in one of the states the action applies to, in one transaction, and record one `operator_action`
row for each notification changed (who, when, from which state to which).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, insert, select, update

from connector.ledger.engine import N, SqlRole, record, utcnow
from connector.ledger.schema import OperatorActionRow
from connector.models import State

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement

    from connector.ledger import NotificationRecord

ACT = OperatorActionRow.__table__  # type: ignore[attr-defined]
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

    @property
    def empty(self) -> bool:
        return not (self.ids or self.keys or self.states or self.mappings or self.sources or self.since or self.until)

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
        if self.since is not None:
            conditions.append(N.c.updated_at >= self.since)
        if self.until is not None:
            conditions.append(N.c.updated_at < self.until)
        return and_(*conditions)


@dataclass(frozen=True)
class Changed:
    """What an action did: the ids changed, per state they were in before."""

    action: str
    to_state: State
    ids: tuple[int, ...]
    by_state: dict[State, int]


@dataclass(frozen=True)
class OperatorAction:
    notification_id: int
    action: str
    from_state: State
    to_state: State
    actor: str
    reason: str
    at: datetime


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
        self, selection: Selection, to_state: State, from_states: Sequence[State], actor: str, reason: str
    ) -> Changed:
        """The selected notifications in `from_states` → `to_state` (sent or cancelled), in one transaction."""
        if to_state not in SETTLED:
            raise ValueError(f"settle sets sent or cancelled, not {to_state.value}")
        now = utcnow()
        values: dict[str, Any] = {
            "state": to_state.value,
            "reason": reason[:500],
            "updated_at": now,
            "lease_owner": None,
            "lease_until": None,
        }
        if to_state is State.SENT:
            values["sent_at"] = now
        return self._act("settle", selection, from_states, to_state, values, actor, reason, now)

    def requeue(
        self, selection: Selection, due_at: datetime, from_states: Sequence[State], actor: str, reason: str
    ) -> Changed:
        """The selected notifications in `from_states` → pending at `due_at`, to be sent again under the same
        key (attempts start again; resends + 1). One whose delivery Paubox has reported is left alone."""
        now = utcnow()
        values: dict[str, Any] = {
            "state": State.PENDING.value,
            "due_at": due_at,
            "reason": reason[:500],
            "resends": N.c.resends + 1,
            "attempts": 0,
            "first_attempt_at": None,
            "alerted_at": None,
            "lease_owner": None,
            "lease_until": None,
            "updated_at": now,
        }
        return self._act("requeue", selection, from_states, State.PENDING, values, actor, reason, now)

    def history(self, notification_id: int) -> list[OperatorAction]:
        """What people did to one notification, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(ACT).where(ACT.c.notification_id == notification_id).order_by(ACT.c.id))
            return [
                OperatorAction(
                    r.notification_id, r.action, State(r.from_state), State(r.to_state), r.actor, r.reason, r.at
                )
                for r in rows
            ]

    def _act(
        self,
        action: str,
        selection: Selection,
        from_states: Sequence[State],
        to_state: State,
        values: dict[str, Any],
        actor: str,
        reason: str,
        now: datetime,
    ) -> Changed:
        condition = selection.where(from_states)
        if action == "requeue":
            condition = and_(condition, N.c.delivery_rank == 0)
        with self.engine.begin() as conn:
            query = select(N.c.id, N.c.state).where(condition).order_by(N.c.id)
            if self.dialect == "postgresql":
                query = query.with_for_update(skip_locked=True)  # one a dispatcher holds now is left alone
            before = {row.id: State(row.state) for row in conn.execute(query)}
            ids = list(before)
            changed: list[int] = []
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                result = conn.execute(update(N).where(N.c.id.in_(chunk), condition).values(**values).returning(N.c.id))
                changed += [row.id for row in result]
            if changed:
                conn.execute(
                    insert(ACT),
                    [
                        {
                            "notification_id": i,
                            "action": action,
                            "from_state": before[i].value,
                            "to_state": to_state.value,
                            "actor": actor[:64],
                            "reason": reason[:200],
                            "at": now,
                        }
                        for i in changed
                    ],
                )
        by_state: dict[State, int] = {}
        for i in changed:
            by_state[before[i]] = by_state.get(before[i], 0) + 1
        return Changed(action, to_state, tuple(sorted(changed)), by_state)
