"""The bounces role: addresses suppressed per patient after bounces (connector.bounces decides; this keeps
the tally), looked up by sending and cleared by an operator. The address is kept as a keyed digest."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from connector.bounces import Tally, after_bounce
from connector.ledger.engine import SUP, N, SqlRole, utcnow


def _aware(value: datetime | None) -> datetime | None:
    return None if value is None else (value if value.tzinfo else value.replace(tzinfo=UTC))


def _tally(row: Any) -> Tally:
    return Tally(row.soft_count, _aware(row.soft_since), _aware(row.suppressed_at), row.reason, _aware(row.cleared_at))


class SqlBounces(SqlRole):
    def bounced(
        self,
        key: str,
        digest: str,
        key_id: str | None,
        hint: str,
        *,
        hard: bool,
        now: datetime,
        soft_limit: int,
        soft_window: timedelta,
    ) -> Tally | None:
        """Count a bounce of the notification `key`'s address for its patient; the tally after it (None: the
        key names no notification of ours)."""
        with self.engine.begin() as conn:
            found = conn.execute(select(N.c.source, N.c.patient_id).where(N.c.key == key)).first()
            if found is None or not found.patient_id:
                return None
            where = (SUP.c.source == found.source, SUP.c.patient_id == found.patient_id, SUP.c.digest == digest)
            conn.execute(
                self._insert(SUP)
                .values(
                    source=found.source,
                    patient_id=found.patient_id,
                    digest=digest,
                    key_id=key_id,
                    hint=hint[:200],
                    origin="bounce",
                    soft_count=0,
                    updated_at=utcnow(),
                )
                .on_conflict_do_nothing(index_elements=["source", "patient_id", "digest"])
            )
            row = conn.execute(select(SUP).where(*where).with_for_update()).one()
            tally = after_bounce(_tally(row), hard=hard, now=now, soft_limit=soft_limit, soft_window=soft_window)
            conn.execute(
                update(SUP)
                .where(*where)
                .values(
                    soft_count=tally.soft_count,
                    soft_since=tally.soft_since,
                    suppressed_at=tally.suppressed_at,
                    reason=tally.reason,
                    cleared_at=tally.cleared_at,
                    updated_at=utcnow(),
                )
            )
            return tally

    def suppressed(self, source: str, patient_id: str, digests: Sequence[str]) -> Tally | None:
        """The suppression of one of these digests (one address under each key) for this patient, if any."""
        return self.suppressed_many([(source, patient_id, digests)])[0]

    def suppressed_many(self, lookups: Sequence[tuple[str, str, Sequence[str]]]) -> list[Tally | None]:
        """`suppressed` for several (source, patient, digests) in one query (a dispatch batch's sends, gathered
        by connector.ledger.batching): one answer per look-up, in order."""
        found: dict[tuple[str, str, str], Tally] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(lookups), 200):
                chunk = lookups[start : start + 200]
                # source, patient and digest together: the unique index (source, patient_id, digest) answers
                rows = conn.execute(
                    select(SUP).where(
                        SUP.c.source.in_(sorted({source for source, _, _ in chunk})),
                        SUP.c.patient_id.in_(sorted({patient for _, patient, _ in chunk})),
                        SUP.c.digest.in_(sorted({digest for _, _, digests in chunk for digest in digests})),
                        SUP.c.suppressed_at.is_not(None),
                        SUP.c.cleared_at.is_(None),
                    )
                )
                for row in rows:
                    found.setdefault((row.source, row.patient_id, row.digest), _tally(row))
        answers: list[Tally | None] = []
        for source, patient_id, digests in lookups:
            hits = (found.get((source, patient_id, digest)) for digest in digests)
            answers.append(next((tally for tally in hits if tally is not None), None))
        return answers

    def clear(self, digests: Sequence[str], source: str | None = None, patient_id: str | None = None) -> int:
        """An operator clears the suppression of an address (for one patient, or everyone it bounced for)."""
        condition = [SUP.c.digest.in_(list(digests)), SUP.c.cleared_at.is_(None), SUP.c.suppressed_at.is_not(None)]
        if source is not None:
            condition.append(SUP.c.source == source)
        if patient_id is not None:
            condition.append(SUP.c.patient_id == patient_id)
        with self.engine.begin() as conn:
            return (
                conn.execute(
                    update(SUP).where(*condition).values(cleared_at=utcnow(), soft_count=0, soft_since=None)
                ).rowcount
                or 0
            )

    def entries(self, limit: int) -> list[tuple[str, str, str, str | None, datetime | None]]:
        """Addresses suppressed now: (source, Patient id, masked hint, reason, since), newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(SUP.c.source, SUP.c.patient_id, SUP.c.hint, SUP.c.reason, SUP.c.suppressed_at)
                .where(SUP.c.suppressed_at.is_not(None), SUP.c.cleared_at.is_(None))
                .order_by(SUP.c.suppressed_at.desc())
                .limit(limit)
            )
            return [(r[0], r[1], r[2], r[3], _aware(r[4])) for r in rows]
