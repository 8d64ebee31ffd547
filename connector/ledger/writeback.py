"""The write-back role: writes to the EHR owed for notifications (a Communication per accepted email, a
not-done one per skipped notification where a source asks for it, a hand-off for a skipped or failed one
where `handoff:` is configured), each tried until the EHR (or the hand-off webhook) accepts or refuses it.

    settled notification ──enqueue──▶ pending ──claim (lease)──▶ written ──▶ done (the EHR's id)
                                         ▲                          │ no answer, 429, 5xx
                                         └──── retry (backoff) ◀────┘ refused (4xx) ──▶ refused

`enqueue` finds what is owed from the notifications themselves (sent, or skipped, within the horizon, with
no row yet), so nothing on the sending path has to remember it: a crash between the send and the write, a
webhook that confirms an in-doubt send later, an operator's `resolve` all end in a row here. The unique
(notification, kind) key keeps it to one row however many replicas enqueue at once; the lease keeps one
replica writing it at a time, and the conditional create on the EHR keeps it to one resource in the chart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update

from connector.ledger.engine import WB, N, SqlRole, utcnow
from connector.models import State

PENDING, DONE, REFUSED = "pending", "done", "refused"
COMMUNICATION, NOT_DONE, HANDOFF = "communication", "not-done", "handoff"
KIND_STATES = {
    COMMUNICATION: (State.SENT.value,),
    NOT_DONE: (State.SKIPPED.value,),
    HANDOFF: (State.SKIPPED.value, State.FAILED.value),
}


@dataclass(frozen=True)
class WriteBackJob:
    """A write owed, with the notification facts the resource is built from (ids, times, reasons)."""

    id: int
    kind: str
    source: str
    attempts: int
    notification_id: int
    key: str
    mapping: str
    event: str
    resource_type: str
    resource_id: str
    patient_id: str
    state: State
    reason: str | None
    sent_at: datetime | None


@dataclass(frozen=True)
class WriteBackProblem:
    kind: str
    source: str
    state: str
    attempts: int
    reason: str | None
    notification_key: str
    updated_at: datetime


def _aware(value: datetime | None) -> datetime | None:
    return None if value is None else (value if value.tzinfo else value.replace(tzinfo=UTC))


class SqlWriteBacks(SqlRole):
    def enqueue(self, kinds: Mapping[str, Sequence[str]], since: datetime, limit: int = 500) -> int:
        """Rows for the writes owed and not yet recorded: `kinds` maps a kind to the sources that want it;
        notifications settled before `since` are left alone. Returns how many rows were added."""
        added = 0
        for kind, sources in kinds.items():
            if not sources:
                continue
            owed = (
                select(N.c.id, N.c.source)
                .where(
                    N.c.state.in_(KIND_STATES[kind]),
                    N.c.source.in_(list(sources)),
                    N.c.updated_at >= since,
                    ~exists().where(WB.c.notification_id == N.c.id, WB.c.kind == kind),
                )
                .order_by(N.c.id)
                .limit(limit)
            )
            with self.engine.begin() as conn:
                rows = conn.execute(owed).all()
                if not rows:
                    continue
                now = utcnow()
                values = [
                    {
                        "notification_id": nid,
                        "kind": kind,
                        "source": source,
                        "state": PENDING,
                        "attempts": 0,
                        "due_at": now,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for nid, source in rows
                ]
                statement = self._insert(WB).on_conflict_do_nothing(index_elements=["notification_id", "kind"])
                added += conn.execute(statement, values).rowcount or 0
        return added

    def claim(self, now: datetime, limit: int, owner: str, lease_until: datetime) -> list[WriteBackJob]:
        """Lease up to `limit` due writes to `owner`, oldest first, with their notifications."""
        free = or_(WB.c.lease_until.is_(None), WB.c.lease_until < now)
        with self.engine.begin() as conn:
            ids = [
                row.id
                for row in conn.execute(
                    select(WB.c.id)
                    .where(WB.c.state == PENDING, WB.c.due_at <= now, free)
                    .order_by(WB.c.due_at, WB.c.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ]
            if not ids:
                return []
            conn.execute(
                update(WB)
                .where(WB.c.id.in_(ids), WB.c.state == PENDING, free)
                .values(lease_owner=owner, lease_until=lease_until)
            )
            rows = conn.execute(
                select(WB, N.c.key, N.c.mapping, N.c.event, N.c.resource_type, N.c.resource_id, N.c.patient_id)
                .add_columns(N.c.state.label("n_state"), N.c.reason.label("n_reason"), N.c.sent_at, N.c.updated_at)
                .join(N, N.c.id == WB.c.notification_id)
                .where(WB.c.id.in_(ids), WB.c.lease_owner == owner)
                .order_by(WB.c.due_at, WB.c.id)
            ).all()
        return [self._job(row) for row in rows]

    @staticmethod
    def _job(row: Any) -> WriteBackJob:
        m = row._mapping
        return WriteBackJob(
            id=m[WB.c.id],
            kind=m[WB.c.kind],
            source=m[WB.c.source],
            attempts=m[WB.c.attempts],
            notification_id=m[WB.c.notification_id],
            key=m[N.c.key],
            mapping=m[N.c.mapping],
            event=m[N.c.event],
            resource_type=m[N.c.resource_type],
            resource_id=m[N.c.resource_id],
            patient_id=m[N.c.patient_id],
            state=State(m["n_state"]),
            reason=m["n_reason"],
            sent_at=_aware(m[N.c.sent_at]) or _aware(m[N.c.updated_at]),
        )

    def _end(self, job_id: int, owner: str, values: dict[str, Any]) -> bool:
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(WB)
                    .where(WB.c.id == job_id, WB.c.lease_owner == owner, WB.c.state == PENDING)
                    .values(**values, lease_owner=None, lease_until=None, updated_at=utcnow())
                ).rowcount
            )

    def done(self, job_id: int, owner: str, resource_id: str) -> bool:
        """The EHR has it (created now, or found by its identifier)."""
        return self._end(
            job_id, owner, {"state": DONE, "resource_id": resource_id[:128], "attempts": WB.c.attempts + 1}
        )

    def retry(self, job_id: int, owner: str, reason: str, due_at: datetime) -> bool:
        """No answer (or one that may hide a write): try again at `due_at`."""
        return self._end(job_id, owner, {"reason": reason[:500], "due_at": due_at, "attempts": WB.c.attempts + 1})

    def refuse(self, job_id: int, owner: str, reason: str) -> bool:
        """The EHR refused it: the same write would be refused again; a person must look."""
        return self._end(job_id, owner, {"state": REFUSED, "reason": reason[:500], "attempts": WB.c.attempts + 1})

    def release(self, owner: str) -> int:
        with self.engine.begin() as conn:
            return (
                conn.execute(
                    update(WB).where(WB.c.lease_owner == owner).values(lease_owner=None, lease_until=None)
                ).rowcount
                or 0
            )

    def counts(self) -> dict[tuple[str, str], int]:
        """Rows per (kind, state)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(WB.c.kind, WB.c.state, func.count()).group_by(WB.c.kind, WB.c.state))
            return {(kind, state): count for kind, state, count in rows}

    def problems(self, limit: int) -> list[WriteBackProblem]:
        """Writes refused, or pending after a failed try, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(WB.c.kind, WB.c.source, WB.c.state, WB.c.attempts, WB.c.reason, N.c.key, WB.c.updated_at)
                .join(N, N.c.id == WB.c.notification_id)
                .where(or_(WB.c.state == REFUSED, and_(WB.c.state == PENDING, WB.c.attempts > 0)))
                .order_by(WB.c.updated_at.desc())
                .limit(limit)
            )
            return [WriteBackProblem(*row[:6], _aware(row[6]) or utcnow()) for row in rows]
