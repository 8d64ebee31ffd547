"""The caps role: what the per-patient daily cap (connector.cap) reads and writes — how many emails a
patient of a source was sent in a span of time, and a notification put off until later."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select, update

from connector.ledger.engine import N, SqlRole, utcnow
from connector.ledger.journal import entry, note
from connector.models import State

COUNTED = (State.SENT.value, State.SENDING.value, State.IN_DOUBT.value)


class SqlCaps(SqlRole):
    def sent_between(
        self, source: str, patient_id: str, since: datetime, until: datetime, leaving_out: Sequence[int] = ()
    ) -> int:
        """Emails to this patient of this source sent (or sending, or in doubt) in [since, until); the ids in
        `leaving_out` are not counted (the caller counts them itself)."""
        when = func.coalesce(N.c.sent_at, N.c.updated_at)
        query = select(func.count()).where(
            N.c.source == source,
            N.c.patient_id == patient_id,
            N.c.state.in_(COUNTED),
            when >= since,
            when < until,
        )
        if leaving_out:
            query = query.where(N.c.id.not_in(list(leaving_out)))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def defer(self, notification_id: int, owner: str, due_at: datetime, reason: str) -> bool:
        """A leased pending notification put off until `due_at` (no attempt spent), its lease given back."""
        with self.engine.begin() as conn:
            deferred = conn.execute(
                update(N)
                .where(N.c.id == notification_id, N.c.state == State.PENDING.value, N.c.lease_owner == owner)
                .values(due_at=due_at, reason=reason[:500], lease_owner=None, lease_until=None, updated_at=utcnow())
            ).rowcount
            if deferred:
                note(conn, [entry("deferred", notification_id, State.PENDING.value, reason)])
        return bool(deferred)
