"""The outbox role: the dispatcher's claims and sends.

    pending ──claim (lease)──▶ pending+lease ──start_sending──▶ sending ──finish──▶ sent | failed | in_doubt
       │                          │ settle                        │ finish(pending) ──▶ pending (later due time)
       └─ (planned skipped)       └──▶ skipped | failed | cancelled └ crash/lease expiry ──▶ in_doubt

Claims use FOR UPDATE SKIP LOCKED on PostgreSQL (SQLite serialises writers itself). `start_sending` and
`finish` take many notifications at once: the dispatcher gathers the writes of its concurrent sends into
one transaction (connector.ledger.batching).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, and_, bindparam, case, func, or_, select, update

from connector.ledger.engine import N, SqlRole, record, utcnow
from connector.ledger.journal import entry, note
from connector.ledger.writes import planned_by
from connector.models import State

if TYPE_CHECKING:
    from connector.ledger import NotificationRecord, SendResult

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


class SqlOutbox(SqlRole):
    def claim_due(
        self, now: datetime, limit: int, owner: str, lease_until: datetime, wall_now: datetime, skip: Sequence[int] = ()
    ) -> list[NotificationRecord]:
        """Lease up to `limit` due notifications to `owner`, oldest first; `skip`: ids not wanted now. Those
        `owner` planned itself are its own to claim during their grace period (see `PlanWrites.affinity`);
        other replicas wait for it to run out."""
        candidates = (
            select(N.c.id)
            .where(
                N.c.state == State.PENDING.value,
                N.c.due_at <= now,
                or_(N.c.lease_until.is_(None), N.c.lease_until < wall_now, N.c.lease_owner == planned_by(owner)),
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
            note(conn, [entry("claimed", r.id, State.PENDING.value, f"leased to {owner}") for r in rows])
        return sorted((record(r) for r in rows), key=lambda r: (r.due_at, r.id))

    def start_sending(self, notification_ids: int | Sequence[int], owner: str, lease_until: datetime) -> set[int]:
        """pending → sending for those still pending and leased by `owner`, in one transaction committed
        before any request leaves. Returns the ids that may be sent now."""
        ids = [notification_ids] if isinstance(notification_ids, int) else list(notification_ids)
        if not ids:
            return set()
        now = utcnow()
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
            .returning(N.c.id, N.c.attempts)
        )
        with self.engine.begin() as conn:
            started = list(conn.execute(statement))
            note(conn, [entry("sending", r.id, State.SENDING.value, f"attempt {r.attempts}", at=now) for r in started])
        return {r.id for r in started}

    def finish(self, results: Sequence[SendResult]) -> None:
        """Record how sends ended, all in one transaction (one statement per kind of ending).
        A notification marked in_doubt meanwhile (its lease ran out) still takes what we learnt."""
        groups: dict[str, list[dict[str, Any]]] = {}
        now = utcnow()
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
            # journal what each row became, and only the rows that took it (not one settled meanwhile)
            ids = [r.notification_id for r in results]
            became: dict[int, str] = dict(
                conn.execute(select(N.c.id, N.c.state).where(N.c.id.in_(ids), N.c.updated_at == now)).all()
            )
            note(conn, [_told(r, became[r.notification_id], now) for r in results if r.notification_id in became])

    def settle(self, notification_id: int, owner: str, state: State, reason: str) -> None:
        with self.engine.begin() as conn:
            if conn.execute(
                update(N)
                .where(N.c.id == notification_id, N.c.state == State.PENDING.value, N.c.lease_owner == owner)
                .values(state=state.value, reason=reason[:500], updated_at=utcnow(), lease_owner=None, lease_until=None)
            ).rowcount:
                note(conn, [entry("outcome", notification_id, state.value, reason)])

    def prepare_failed(self, notification_id: int, owner: str, reason: str, due_at: datetime | None) -> None:
        """Preparing a leased notification crashed: one attempt spent, then pending again at `due_at`, or
        `failed` when `due_at` is None (the attempts or the age are used up)."""
        now = utcnow()
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
            if conn.execute(
                update(N)
                .where(N.c.id == notification_id, N.c.state == State.PENDING.value, N.c.lease_owner == owner)
                .values(**values)
            ).rowcount:
                state = State.FAILED.value if due_at is None else State.PENDING.value
                note(conn, [entry("outcome", notification_id, state, f"could not be prepared: {reason}", at=now)])

    def release(self, owner: str | None, notification_ids: Sequence[int] | None = None) -> int:
        condition = N.c.state == State.PENDING.value
        mine = N.c.lease_owner.in_([owner, planned_by(owner)]) if owner is not None else None
        condition = and_(condition, N.c.lease_owner.is_not(None) if mine is None else mine)
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
                    updated_at=utcnow(),
                    lease_owner=None,
                    lease_until=None,
                )
                .returning(N.c.id, N.c.state)
            )
            interrupted = list(result)
            confirmed = "confirmed by a Paubox webhook"
            note(
                conn, [entry("outcome", r.id, r.state, confirmed if r.state == "sent" else reason) for r in interrupted]
            )
        return len(interrupted)


def _told(result: SendResult, became: str, now: datetime) -> dict[str, Any]:
    """The journal's entry of a send's outcome: the state the row took, its reason and Paubox's tracking id
    (an in_doubt answer on a row a webhook had already confirmed made it sent)."""
    if became != result.state.value:
        return entry("outcome", result.notification_id, became, "confirmed by a Paubox webhook", at=now)
    parts = [result.reason or ""]
    if result.state is State.SENT and result.tracking_id:
        parts.append(f"Paubox tracking id {result.tracking_id}")
    return entry("outcome", result.notification_id, became, "; ".join(p for p in parts if p), at=now)
