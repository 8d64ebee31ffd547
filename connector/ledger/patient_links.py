"""What patients' links ask of the ledger: the notification a link names, where its email went (recorded when
it was prepared: the keyed opt-out digest of the address, never the address), and an unsubscribe: that
address on the opt-out list and the pending notifications of the category withdrawn (the reason recorded on
each), in one transaction and without reading the EHR."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import or_, select, update

from connector.ledger.engine import LR, OPT, N, SqlRole, record, utcnow
from connector.ledger.journal import entry, note
from connector.ledger.writes import planned_by
from connector.models import State

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from connector.ledger import NotificationRecord


class SqlPatientLinks(SqlRole):
    def notification(self, notification_id: int) -> NotificationRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(N).where(N.c.id == notification_id)).first()
        return None if row is None else record(row)

    def remember(self, notification_id: int, kind: str, digest: str, key_id: str, when: datetime) -> None:
        """Record where a notification's email goes (`digest`: the keyed opt-out digest, under `key_id`)."""
        values = {"notification_id": notification_id, "kind": kind, "digest": digest, "key_id": key_id}
        statement = self._insert(LR).values(**values, recorded_at=when)
        # Prepared again (a retry, a resend): the newest link's expiry counts for `forget`.
        statement = statement.on_conflict_do_update(
            index_elements=[LR.c.notification_id, LR.c.kind, LR.c.digest],
            set_={"recorded_at": statement.excluded.recorded_at},
            where=LR.c.recorded_at < statement.excluded.recorded_at,
        )
        with self.engine.begin() as conn:
            conn.execute(statement)

    def forget(self, recorded_before: datetime) -> int:
        """Drop the records of emails whose unsubscribe links have all expired; how many."""
        with self.engine.begin() as conn:
            return int(conn.execute(LR.delete().where(LR.c.recorded_at < recorded_before)).rowcount)

    def recipients(self, notification_id: int) -> list[tuple[str, str, str]]:
        """(kind, keyed digest, key id) of every address this notification's email went to."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(LR).where(LR.c.notification_id == notification_id).order_by(LR.c.digest))
            return [(r.kind, r.digest, r.key_id) for r in rows]

    def unsubscribe(
        self,
        notification_id: int,
        category: str,
        mappings: Sequence[str],
        reason: str,
        when: datetime,
        key_ids: Collection[str],
    ) -> tuple[int, int]:
        """Opt out (origin `link`, for `category`, '' = every email) each address this notification's email
        went to, and withdraw the patient's pending notifications of these mappings. (Addresses newly on the
        list, notifications withdrawn.) A second click adds nothing and withdraws nothing more. A digest
        keyed with a key no longer in `key_ids` (optout.keys) is not added: it would match nobody."""
        with self.engine.begin() as conn:
            row = conn.execute(select(N).where(N.c.id == notification_id)).first()
            if row is None:
                return 0, 0
            added = 0
            for r in conn.execute(select(LR).where(LR.c.notification_id == notification_id)).all():
                if r.key_id in key_ids:
                    added += self._opt_out(conn, r.kind, r.digest, r.key_id, category, notification_id, when)
            return added, self._withdraw(conn, row.source, row.patient_id, mappings, reason)

    def _opt_out(
        self, conn: Connection, kind: str, digest: str, key_id: str, category: str, notification_id: int, when: datetime
    ) -> int:
        statement = self._insert(OPT).values(
            kind=kind,
            digest=digest,
            key_id=key_id,
            hint="(unsubscribe link)",
            note=f"the patient's unsubscribe link (notification {notification_id})",
            category=category,
            origin="link",
            created_at=when,
        )
        return len(conn.execute(statement.on_conflict_do_nothing().returning(OPT.c.id)).all())

    def withdraw(self, source: str, patient_id: str, mappings: Sequence[str], reason: str) -> int:
        """Cancel the pending notifications of these mappings for one patient of one source; how many."""
        with self.engine.begin() as conn:
            return self._withdraw(conn, source, patient_id, mappings, reason)

    @staticmethod
    def _withdraw(conn: Connection, source: str, patient_id: str, mappings: Sequence[str], reason: str) -> int:
        if not mappings:
            return 0
        result = conn.execute(
            update(N)
            .where(
                N.c.source == source,
                N.c.patient_id == patient_id,
                N.c.mapping.in_(list(mappings)),
                N.c.state == State.PENDING.value,
                # not being sent now: no lease, or only the planning replica's affinity marker (outbox)
                or_(N.c.lease_owner.is_(None), N.c.lease_owner.like(planned_by("%"))),
            )
            .values(state=State.CANCELLED.value, reason=reason[:500], updated_at=utcnow())
            .returning(N.c.id)
        )
        withdrawn = [entry("withdrawn", i, State.CANCELLED.value, reason, source=source) for i in result.scalars()]
        note(conn, withdrawn)
        return len(withdrawn)
