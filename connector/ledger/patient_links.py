"""What patients' links ask of the ledger: the notification a link names, and withdrawing the pending
notifications of a category a patient unsubscribed from (the reason recorded on each)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import select, update

from connector.ledger.engine import N, SqlRole, record, utcnow
from connector.ledger.journal import entry, note
from connector.models import State

if TYPE_CHECKING:
    from connector.ledger import NotificationRecord


class SqlPatientLinks(SqlRole):
    def notification(self, notification_id: int) -> NotificationRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(N).where(N.c.id == notification_id)).first()
        return None if row is None else record(row)

    def withdraw(self, source: str, patient_id: str, mappings: Sequence[str], reason: str) -> int:
        """Cancel the pending notifications of these mappings for one patient of one source; how many."""
        if not mappings:
            return 0
        with self.engine.begin() as conn:
            result = conn.execute(
                update(N)
                .where(
                    N.c.source == source,
                    N.c.patient_id == patient_id,
                    N.c.mapping.in_(list(mappings)),
                    N.c.state == State.PENDING.value,
                    N.c.lease_owner.is_(None),
                )
                .values(state=State.CANCELLED.value, reason=reason[:500], updated_at=utcnow())
                .returning(N.c.id)
            )
            withdrawn = [entry("withdrawn", i, State.CANCELLED.value, reason, source=source) for i in result.scalars()]
            note(conn, withdrawn)
        return len(withdrawn)
