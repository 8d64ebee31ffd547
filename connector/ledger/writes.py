"""Writes that more than one role makes inside its own transaction: planned notifications (the unique key
decides), seen versions, remembered appointment states, withdrawals and the cursor. Callers hold the
connection; nothing here commits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection

from connector.ledger.engine import A, C, N, S, SqlRole, utcnow
from connector.ledger.journal import entry, note
from connector.models import PlannedNotification, State

if TYPE_CHECKING:
    from connector.ledger import SeenVersion, Withdrawal
    from connector.lifecycle import Snapshot


def planned_by(owner: str) -> str:
    """The lease a daemon's new notifications carry for a grace period: its own poll cache holds their
    resources, so it claims them first (see `SqlOutbox.claim_due`); not a claim, so nothing may send them."""
    return f"planned:{owner}"


class PlanWrites(SqlRole):
    """The statements of recording what intake planned (used by SqlIntake and SqlInbox)."""

    # (owner, grace): new pending notifications are leased to `planned_by(owner)` for `grace` (a daemon
    # sharing a PostgreSQL ledger sets it; see connector.daemon). None: any replica may claim them at once.
    affinity: tuple[str, timedelta] | None = None

    def _withdraw(self, conn: Connection, source: str, withdrawal: Withdrawal) -> None:
        withdrawn = conn.execute(
            update(N)
            .where(
                N.c.source == source,
                N.c.resource_id == withdrawal.appointment_id,
                N.c.patient_id.in_(list(withdrawal.patients)),
                N.c.state == State.PENDING.value,
            )
            .values(
                state=State.CANCELLED.value,
                reason=withdrawal.reason,
                updated_at=utcnow(),
                lease_owner=None,
                lease_until=None,
            )
            .returning(N.c.id)
        ).scalars()
        note(conn, [entry("withdrawn", i, State.CANCELLED.value, withdrawal.reason, source=source) for i in withdrawn])

    def _keep_states(self, conn: Connection, source: str, snapshots: Mapping[str, Snapshot | None]) -> None:
        now = utcnow()
        kept = [
            {
                "source": source,
                "appointment_id": appointment_id,
                "status": snap.status,
                "start": snap.start,
                "end": snap.end,
                "version": snap.version,
                "patients": " ".join(snap.patients),
                "last_updated": snap.last_updated,
                "deleted": False,
                "updated_at": now,
            }
            for appointment_id, snap in snapshots.items()
            if snap is not None
        ]
        self._journal_states(conn, source, snapshots, now)
        if kept:
            statement = self._insert(A)
            # A poll and a pushed notification may race: an older version never replaces a newer one.
            newer = (
                A.c.last_updated.is_(None)
                | statement.excluded.last_updated.is_(None)
                | (A.c.last_updated <= statement.excluded.last_updated)
            )
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["source", "appointment_id"],
                    where=newer,
                    set_={
                        name: statement.excluded[name] for name in kept[0] if name not in ("source", "appointment_id")
                    },
                ),
                kept,
            )
        deleted = [
            {"src": source, "aid": appointment_id, "now": now}
            for appointment_id, snap in snapshots.items()
            if snap is None
        ]
        if deleted:
            conn.execute(
                update(A)
                .where(A.c.source == bindparam("src"), A.c.appointment_id == bindparam("aid"))
                .values(deleted=True, updated_at=bindparam("now")),
                deleted,
            )

    def _journal_states(
        self, conn: Connection, source: str, snapshots: Mapping[str, Snapshot | None], now: datetime
    ) -> None:
        """An appointment entry for each one whose status or version changed (from what was remembered)."""
        ids = list(snapshots)
        before: dict[str, Any] = {}
        for start in range(0, len(ids), 500):
            rows = conn.execute(
                select(A.c.appointment_id, A.c.status, A.c.version, A.c.start, A.c.last_updated, A.c.deleted).where(
                    A.c.source == source, A.c.appointment_id.in_(ids[start : start + 500])
                )
            )
            before.update({r.appointment_id: r for r in rows})
        entries = []
        for appointment_id, snap in snapshots.items():
            old = before.get(appointment_id)
            if snap is None:
                if old is not None and not old.deleted:
                    entries.append(entry("appointment", None, "deleted", f"deleted (was {old.status})", at=now))
                else:
                    continue
            elif old is None or old.deleted:
                entries.append(entry("appointment", None, snap.status, f"version {snap.version}: first seen", at=now))
            elif (old.status, old.version) != (snap.status, snap.version) and not (
                old.last_updated and snap.last_updated and old.last_updated > snap.last_updated
            ):
                move = "same status" if old.status == snap.status else f"{old.status} → {snap.status}"
                moved = "; start moved" if old.start != snap.start else ""
                entries.append(
                    entry("appointment", None, snap.status, f"version {snap.version}: {move}{moved}", at=now)
                )
            else:
                continue
            entries[-1].update(source=source, appointment_id=appointment_id[:128])
        note(conn, entries)

    def _insert_notifications(self, conn: Connection, notifications: Sequence[PlannedNotification]) -> list[str]:
        notifications = list({n.key: n for n in reversed(notifications)}.values())[::-1]  # one row per key
        if not notifications:
            return []
        now = utcnow()
        owner, until = (planned_by(self.affinity[0]), now + self.affinity[1]) if self.affinity else (None, None)
        rows = [
            {
                "key": n.key,
                "source": n.source,
                "mapping": n.mapping,
                "event": n.event,
                "resource_type": n.resource_type,
                "resource_id": n.resource_id[:128],
                "resource_version": n.resource_version,
                "patient_id": n.patient_id,
                "state": n.state.value,
                "reason": (n.reason or "")[:500] or None,
                "attempts": 0,
                "due_at": n.due_at,
                "created_at": now,
                "updated_at": now,
                "appointment_start": n.appointment_start,
                "lease_owner": owner if n.state is State.PENDING else None,
                "lease_until": until if n.state is State.PENDING else None,
            }
            for n in notifications
        ]
        statement = self._insert(N)
        # A key that exists stays as it is: the unique constraint decides. The one exception is a
        # notification withdrawn before any attempt to send it (`cancelled`, never started) and planned
        # again, which is re-armed. One cancelled by an operator after it was in doubt stays cancelled.
        statement = statement.on_conflict_do_update(
            index_elements=["key"],
            set_={
                "state": statement.excluded.state,
                "due_at": statement.excluded.due_at,
                "reason": None,
                "attempts": 0,
                "lease_owner": None,
                "lease_until": None,
                "updated_at": now,
                "resource_version": statement.excluded.resource_version,
                "appointment_start": statement.excluded.appointment_start,
            },
            where=(N.c.state == State.CANCELLED.value)
            & N.c.first_attempt_at.is_(None)
            & (statement.excluded.state == State.PENDING.value),
        ).returning(N.c.key, N.c.id)
        inserted = list(conn.execute(statement, rows))
        planned = {n.key: n for n in notifications}
        note(
            conn,
            [
                entry(
                    "planned",
                    row.id,
                    planned[row.key].state.value,
                    f"{planned[row.key].event} from {planned[row.key].resource_type} version "
                    f"{planned[row.key].resource_version}"
                    + (f"; {planned[row.key].reason}" if planned[row.key].reason else ""),
                    at=now,
                    source=planned[row.key].source,
                )
                for row in inserted
            ],
        )
        return [row.key for row in inserted]

    def _remember(self, conn: Connection, source: str, seen: Sequence[SeenVersion]) -> None:
        if not seen:
            return
        now = utcnow()
        rows = [
            {
                "source": source,
                "resource_type": s.resource_type,
                "resource_id": s.resource_id,
                "version": s.version,
                "last_updated": s.last_updated,
                "problem": s.problem,
                "seen_at": now,
            }
            for s in seen
        ]
        conn.execute(self._insert(S).on_conflict_do_nothing(), rows)

    def _advance(self, conn: Connection, source: str, cursor: datetime) -> None:
        statement = self._insert(C).values(source=source, value=cursor, updated_at=utcnow())
        statement = statement.on_conflict_do_update(
            index_elements=["source"],
            set_={"value": statement.excluded.value, "updated_at": statement.excluded.updated_at},
            where=C.c.value < statement.excluded.value,
        )
        conn.execute(statement)
