"""The after-send role: what is learnt after a send. A Paubox webhook confirms a notification in doubt and
updates delivery statuses; receipts are asked for; doubt is resent under the same key or held for a person,
who resolves it (`connector resolve`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, select, update

from connector.ledger.engine import N, SqlRole, record, utcnow
from connector.ledger.journal import entry, note
from connector.models import State

if TYPE_CHECKING:
    from connector.ledger import NotificationRecord


class SqlAfterSend(SqlRole):
    def confirm(self, key: str, tracking_id: str | None, reason: str) -> bool:
        """Paubox has the message (a webhook named its key): in_doubt → sent. True when it was in doubt."""
        values: dict[str, Any] = {
            "state": State.SENT.value,
            "reason": reason,
            "updated_at": utcnow(),
            "sent_at": utcnow(),
        }
        if tracking_id:
            values["tracking_id"] = tracking_id[:128]
        doubtful = (N.c.state == State.IN_DOUBT.value) | ((N.c.state == State.PENDING.value) & (N.c.resends > 0))
        with self.engine.begin() as conn:
            ids = conn.execute(
                update(N)
                .where(N.c.key == key, doubtful)
                .values(**values, lease_owner=None, lease_until=None)
                .returning(N.c.id)
            ).scalars()
            entries = [entry("confirmed", i, State.SENT.value, reason) for i in ids]
            note(conn, entries)
        return bool(entries)

    def record_delivery(
        self, key: str | None, tracking_id: str | None, status: str, rank: int, when: datetime, via: str = "webhook"
    ) -> bool:
        """Store a delivery status unless a stronger one is already there (repeats and late events are
        harmless). Matched by key, else by Paubox tracking id. `via`: webhook or receipt (for the journal)."""
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
            ids = conn.execute(
                update(N).where(where, N.c.delivery_rank < rank).values(**values).returning(N.c.id)
            ).scalars()
            entries = [entry("delivery", i, status[:32], f"by {via}", at=utcnow()) for i in ids]
            note(conn, entries)
        return bool(entries)

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
            return [record(r) for r in rows]

    def overdue_in_doubt(self, updated_before: datetime, limit: int) -> list[NotificationRecord]:
        """In-doubt notifications nobody has confirmed since `updated_before` and not yet handled."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(N)
                .where(N.c.state == State.IN_DOUBT.value, N.c.alerted_at.is_(None), N.c.updated_at < updated_before)
                .order_by(N.c.id)
                .limit(limit)
            )
            return [record(r) for r in rows]

    def mark_alerted(self, notification_ids: Sequence[int]) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(N).where(N.c.id.in_(list(notification_ids))).values(alerted_at=utcnow()))
            note(
                conn, [entry("alerted", i, State.IN_DOUBT.value, "reported to the operators") for i in notification_ids]
            )

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
            changed = conn.execute(
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
                    updated_at=utcnow(),
                )
            ).rowcount
            if changed:
                note(conn, [entry("resent", notification_id, State.PENDING.value, reason)])
        return bool(changed)

    def resolve(self, key: str, state: State, reason: str, from_states: Sequence[State]) -> bool:
        """An operator's decision on a notification (in_doubt → sent or cancelled, ...)."""
        values: dict[str, Any] = {"state": state.value, "reason": reason[:500], "updated_at": utcnow()}
        if state is State.SENT:
            values["sent_at"] = utcnow()
        with self.engine.begin() as conn:
            ids = conn.execute(
                update(N)
                .where(N.c.key == key, N.c.state.in_([s.value for s in from_states]))
                .values(**values)
                .returning(N.c.id)
            ).scalars()
            entries = [entry("outcome", i, state.value, reason) for i in ids]
            note(conn, entries)
        return bool(entries)
