"""The reports role: what `connector status`, the dry runs and replays read (counts, listings, cursors,
quarantined versions, notifications by key), and the counts of refused webhook requests the daemon adds
for them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import func, select

from connector.ledger import NotificationRecord, SeenVersion
from connector.ledger.engine import REJ, C, N, S, SqlRole, record
from connector.models import State


class SqlReports(SqlRole):
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
            return [record(r) for r in rows]

    def due(self, now: datetime, limit: int) -> list[NotificationRecord]:
        """Pending notifications due at `now` (read-only; for dry runs)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(N)
                .where(N.c.state == State.PENDING.value, N.c.due_at <= now)
                .order_by(N.c.due_at, N.c.id)
                .limit(limit)
            )
            return [record(r) for r in rows]

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

    def existing(self, keys: Sequence[str]) -> dict[str, NotificationRecord]:
        found: dict[str, NotificationRecord] = {}
        for start in range(0, len(keys), 500):
            with self.engine.connect() as conn:
                for row in conn.execute(select(N).where(N.c.key.in_(keys[start : start + 500]))):
                    found[row.key] = record(row)
        return found

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
