"""The inbox role: received CRM events, sealed (connector.crm.inbox), stored before the sender is answered,
planned from there (their notifications and their processed mark in one transaction), and purged after
their retention."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, and_, cast, exists, select, update

from connector.ledger.engine import INBOX, A, N, utcnow
from connector.ledger.writes import PlanWrites
from connector.models import State

if TYPE_CHECKING:
    from connector.ledger import SeenVersion, Withdrawal
    from connector.lifecycle import Snapshot
    from connector.models import PlannedNotification


class SqlInbox(PlanWrites):
    def add(self, rows: Sequence[dict[str, Any]]) -> int:
        """Store received events; one already there (same source and event id) is left alone. Committed
        before the sender is answered. Returns how many were new."""
        if not rows:
            return 0
        with self.engine.begin() as conn:
            statement = self._insert(INBOX).on_conflict_do_nothing(index_elements=["source", "event_id"])
            return len(list(conn.execute(statement.returning(INBOX.c.id), list(rows))))

    def pending(self, limit: int, after: int = 0) -> list[Any]:
        """Unprocessed events in the order received (those after inbox id `after`)."""
        waiting = and_(INBOX.c.processed_at.is_(None), INBOX.c.id > after)
        with self.engine.connect() as conn:
            return list(conn.execute(select(INBOX).where(waiting).order_by(INBOX.c.id).limit(limit)))

    def window(self, source: str, since: datetime | None, until: datetime | None) -> list[Any]:
        condition = INBOX.c.source == source
        if since is not None:
            condition = and_(condition, INBOX.c.received_at >= since)
        if until is not None:
            condition = and_(condition, INBOX.c.received_at <= until)
        with self.engine.connect() as conn:
            return list(conn.execute(select(INBOX).where(condition).order_by(INBOX.c.id)))

    def get(self, inbox_id: int) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(INBOX).where(INBOX.c.id == inbox_id)).first()

    def commit(
        self,
        inbox_ids: Sequence[int],
        notifications: Sequence[PlannedNotification],
        quarantined: Sequence[tuple[str, SeenVersion]] = (),
        states: Sequence[tuple[str, str, Snapshot | None]] = (),
        withdrawals: Sequence[tuple[str, Withdrawal]] = (),
    ) -> list[str]:
        """Planned notifications and the events they came from, marked processed, in one transaction; events
        that could not be processed are recorded as quarantined ((source, record) pairs). CRM appointments:
        their withdrawals come first (before the notifications that replace what they withdraw), their new
        states last."""
        with self.engine.begin() as conn:
            for source, withdrawal in withdrawals:
                self._withdraw(conn, source, withdrawal)
            inserted = self._insert_notifications(conn, notifications)
            for source, seen in quarantined:
                self._remember(conn, source, [seen])
            for source, appointment_id, state in states:
                self._keep_states(conn, source, {appointment_id: state})
            if inbox_ids:
                conn.execute(update(INBOX).where(INBOX.c.id.in_(list(inbox_ids))).values(processed_at=utcnow()))
        return inserted

    def purge(self, received_before: datetime) -> int:
        """Forget processed events older than the retention (their notifications keep their keys). The event
        a remembered CRM appointment was last told by stays while that appointment still has mail to go
        (pending, being sent, or in doubt and perhaps resent), since it is rendered from that event, but not
        past the retention of the appointment's start; then it goes too (it holds patient data)."""
        to_go = exists().where(
            N.c.source == A.c.source,
            N.c.resource_type == "CrmAppointment",
            N.c.resource_id == A.c.appointment_id,
            N.c.state.in_([State.PENDING.value, State.SENDING.value, State.IN_DOUBT.value]),
        )
        told_by = exists().where(
            A.c.source == INBOX.c.source,
            A.c.version == cast(INBOX.c.id, String),
            A.c.deleted.is_(False),
            A.c.start.is_(None) | (A.c.start >= received_before),
            to_go,
        )
        with self.engine.begin() as conn:
            return conn.execute(
                INBOX.delete().where(INBOX.c.received_at < received_before, INBOX.c.processed_at.is_not(None), ~told_by)
            ).rowcount
