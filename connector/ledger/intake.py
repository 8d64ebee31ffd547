"""The intake role: what intake records and reads back. Pages of planned notifications with the seen
versions, remembered appointment states, withdrawals and the cursor, in one transaction; the versions
already seen; the states and who was told; the per-source poll lock; Subscription bookkeeping.

The cursor never moves back (the UPDATE only raises it) and moves in the same transaction as the
notifications it produced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, text
from sqlalchemy.engine import Connection

from connector.ledger.engine import NOTIFIED, SUB, A, C, N, S
from connector.ledger.writes import PlanWrites
from connector.lifecycle import Snapshot

if TYPE_CHECKING:
    from connector.ledger import SeenVersion, Withdrawal
    from connector.models import PlannedNotification


class SqlIntake(PlanWrites):
    def record_page(
        self,
        source: str,
        notifications: Sequence[PlannedNotification],
        seen: Sequence[SeenVersion],
        cursor: datetime | None,
        snapshots: Mapping[str, Snapshot | None] | None = None,
        withdrawals: Sequence[Withdrawal] = (),
    ) -> list[str]:
        with self.engine.begin() as conn:
            for withdrawal in withdrawals:
                self._withdraw(conn, source, withdrawal)
            inserted = self._insert_notifications(conn, notifications)
            self._remember(conn, source, seen)
            self._keep_states(conn, source, snapshots or {})
            if cursor is not None:
                self._advance(conn, source, cursor)
        return inserted

    def add(
        self,
        notifications: Sequence[PlannedNotification],
        source: str | None = None,
        withdrawals: Sequence[Withdrawal] = (),
    ) -> list[str]:
        with self.engine.begin() as conn:
            for withdrawal in withdrawals:
                assert source is not None
                self._withdraw(conn, source, withdrawal)
            return self._insert_notifications(conn, notifications)

    def new_versions(self, source: str, versions: Sequence[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
        wanted = set(versions)
        if not wanted:
            return set()
        ids = sorted({v[1] for v in wanted})
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(S.c.resource_type, S.c.resource_id, S.c.version).where(
                    S.c.source == source, S.c.resource_id.in_(ids)
                )
            )
            known = {(r.resource_type, r.resource_id, r.version) for r in rows}
        return wanted - known

    def cursor(self, source: str) -> datetime | None:
        with self.engine.connect() as conn:
            value = conn.execute(select(C.c.value).where(C.c.source == source)).scalar_one_or_none()
        return value

    def snapshots(self, source: str, appointment_ids: Sequence[str]) -> dict[str, Snapshot]:
        found: dict[str, Snapshot] = {}
        ids = list(dict.fromkeys(appointment_ids))
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                rows = conn.execute(
                    select(A).where(
                        A.c.source == source, A.c.deleted.is_(False), A.c.appointment_id.in_(ids[start : start + 500])
                    )
                )
                for r in rows:
                    found[r.appointment_id] = Snapshot(
                        r.status, r.start, r.end, r.version, tuple(r.patients.split()), r.last_updated
                    )
        return found

    def window_snapshots(self, source: str, start: datetime, end: datetime) -> dict[str, Snapshot]:
        """Remembered appointments starting in [start, end) that have not ended (for date-window polls)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(A).where(
                    A.c.source == source,
                    A.c.deleted.is_(False),
                    A.c.start >= start,
                    A.c.start < end,
                    A.c.status.not_in(["cancelled", "noshow", "entered-in-error"]),
                )
            )
            return {
                r.appointment_id: Snapshot(
                    r.status, r.start, r.end, r.version, tuple(r.patients.split()), r.last_updated
                )
                for r in rows
            }

    def snapshot(self, source: str, appointment_id: str) -> Snapshot | None:
        """The remembered state, deleted or not (to render a cancellation after a delete)."""
        with self.engine.connect() as conn:
            r = conn.execute(select(A).where(A.c.source == source, A.c.appointment_id == appointment_id)).first()
        if r is None:
            return None
        return Snapshot(r.status, r.start, r.end, r.version, tuple(r.patients.split()), r.last_updated)

    def notified(self, source: str, appointment_ids: Sequence[str]) -> set[tuple[str, str]]:
        ids = list(dict.fromkeys(appointment_ids))
        found: set[tuple[str, str]] = set()
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                rows = conn.execute(
                    select(N.c.resource_id, N.c.patient_id)
                    .distinct()
                    .where(N.c.source == source, N.c.resource_id.in_(ids[start : start + 500]), N.c.state.in_(NOTIFIED))
                )
                found |= {(r.resource_id, r.patient_id) for r in rows}
        return found

    def prune_seen(self, source: str, before: datetime) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(
                S.delete().where(S.c.source == source, S.c.problem.is_(None), S.c.last_updated < before)
            )
        return result.rowcount

    def try_lock_source(self, source: str) -> Connection | bool:
        """Only one process polls a source at a time. PostgreSQL: a session advisory lock, held on the
        returned connection until `unlock_source`; False when another replica holds it. SQLite serves one
        process (see runtime.lock_sqlite): always True."""
        if self.dialect != "postgresql":
            return True
        conn = self.engine.connect()
        # Advisory locks are per database: the schema is part of the key, so that two deployments in two
        # schemas of one database do not wait for each other.
        schema = conn.execute(text("SELECT current_schema()")).scalar()
        key = int.from_bytes(
            hashlib.sha256(f"connector:poll:{schema}:{source}".encode()).digest()[:8], "big", signed=True
        )
        if conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar():
            conn.info["poll_lock"] = key
            conn.commit()
            return conn
        conn.close()
        return False

    def unlock_source(self, handle: object) -> None:
        if isinstance(handle, Connection):
            handle.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": handle.info.pop("poll_lock")})
            handle.commit()
            handle.close()

    def heard(
        self, source: str, subscription: str, events: int | None, status: str | None, when: datetime
    ) -> int | None:
        """Note a notification; returns the event count known before it (None: never heard of it).
        The stored count only grows."""
        with self.engine.begin() as conn:
            before = conn.execute(
                select(SUB.c.events).where(SUB.c.source == source, SUB.c.subscription == subscription)
            ).scalar()
            values: dict[str, Any] = {"last_seen": when, "status": status}
            if events is not None:
                values["events"] = max(events, before or 0)
            statement = self._insert(SUB).values(
                source=source,
                subscription=subscription,
                events=values.get("events", before or 0),
                status=status,
                last_seen=when,
            )
            conn.execute(statement.on_conflict_do_update(index_elements=["source", "subscription"], set_=values))
        return int(before) if before is not None else None

    def subscriptions(self, source: str) -> list[tuple[str, int, str | None, datetime]]:
        with self.engine.connect() as conn:
            return [
                (r.subscription, r.events, r.status, r.last_seen)
                for r in conn.execute(select(SUB).where(SUB.c.source == source))
            ]
