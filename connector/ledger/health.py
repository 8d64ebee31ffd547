"""The health rows the daemon keeps in the ledger for `connector status`, and the cheap reads behind the
gauges of `/metrics`.

Readiness and scrapes read through a probe engine of their own (no pool, short connect and busy
timeouts), so that a busy daemon's pool never makes a healthy ledger look unreachable, and an unreachable
one answers "no" within `health.ledger_timeout` instead of waiting for a pooled connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, case, create_engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from connector.health import MailerFacts, SourceFacts
from connector.ledger.engine import WB, N, S, SqlRole
from connector.ledger.schema import ComponentHealthRow
from connector.models import State

H = ComponentHealthRow.__table__  # type: ignore[attr-defined]
MAILER = "mailer"


@dataclass(frozen=True)
class LedgerGauges:
    """What `/metrics` shows of the ledger."""

    states: dict[str, int]  # notifications per state (every state, zero included)
    oldest_due_pending: float  # seconds since the oldest due `pending` notification was due (0: none)
    quarantined: dict[str, int]  # resource versions set aside with a problem, per source
    write_backs: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, state) not done: pending, refused


def describe(exc: BaseException) -> str:
    """A database error in one line, without the SQL statement (which may hold parameters)."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    original = getattr(exc, "orig", None) or exc
    first = (str(original).strip().splitlines() or [""])[0]
    return f"{type(original).__name__}: {first}"[:300] if first else type(original).__name__


def probe_engine(url: str, timeout: float) -> Engine:
    """An engine for health checks: a new connection each time, given up after `timeout` seconds."""
    if make_url(url).get_backend_name() == "sqlite":
        return create_engine(url, poolclass=NullPool, connect_args={"timeout": timeout, "check_same_thread": False})
    return create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": max(1, round(timeout))})


class SqlHealth(SqlRole):
    """The health role: the rows a daemon writes for `connector status` and readiness checks (over the
    daemon's engine), read back by `/healthz`, `/metrics` and `status` (over a probe engine, see above)."""

    def _upsert(self, values: dict[str, Any], update: dict[str, Any]) -> None:
        statement = self._insert(H).values(**values)
        fresh = statement.excluded
        statement = statement.on_conflict_do_update(
            index_elements=["component"],
            set_={name: value(fresh) if callable(value) else value for name, value in update.items()},
        )
        with self.engine.begin() as conn:
            conn.execute(statement)

    def poll_completed(self, source: str, when: datetime) -> None:
        """A poll of `source` read everything it meant to: the newest completion wins (replicas race)."""
        newer = (H.c.last_ok_at.is_(None)) | (H.c.last_ok_at < when)
        self._upsert(
            {"component": f"source:{source}", "state": "ok", "since": when, "last_ok_at": when, "updated_at": when},
            {
                "state": lambda x: case((newer, "ok"), else_=H.c.state),
                "since": lambda x: case((newer & (H.c.state != "ok"), x.since), else_=H.c.since),
                "last_ok_at": lambda x: case((newer, x.last_ok_at), else_=H.c.last_ok_at),
                "updated_at": lambda x: x.updated_at,
            },
        )

    def poll_failed(self, source: str, when: datetime, problem: str) -> None:
        """A poll of `source` failed; `since` keeps the first failure after the last completed poll."""
        self._upsert(
            {
                "component": f"source:{source}",
                "state": "failing",
                "since": when,
                "problem": problem[:500],
                "problem_at": when,
                "updated_at": when,
            },
            {
                "state": lambda x: "failing",
                "since": lambda x: case((H.c.state == "failing", H.c.since), else_=x.since),
                "problem": lambda x: x.problem,
                "problem_at": lambda x: x.problem_at,
                "updated_at": lambda x: x.updated_at,
            },
        )

    def mailer_changed(self, facts: MailerFacts, when: datetime) -> None:
        values = {
            "component": MAILER,
            "state": facts.state,
            "since": facts.since or when,
            "problem": (facts.reason or "")[:500] or None,
            "updated_at": when,
        }
        if facts.reason:
            values["problem_at"] = when
        self._upsert(values, {name: (lambda x, n=name: x[n]) for name in values if name != "component"})

    def sources(self) -> dict[str, SourceFacts]:
        """Every source's row (read by readiness checks and by `connector status`)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(H).where(H.c.component.like("source:%")))
            return {
                row.component.split(":", 1)[1]: SourceFacts(
                    row.last_ok_at, row.problem, row.problem_at, row.since if row.state == "failing" else None
                )
                for row in rows
            }

    def mailer(self) -> tuple[MailerFacts, datetime] | None:
        """The mailer's state as a daemon last wrote it, and when."""
        with self.engine.connect() as conn:
            row = conn.execute(select(H).where(H.c.component == MAILER)).first()
        return None if row is None else (MailerFacts(row.state, row.problem, row.since), row.updated_at)

    def gauges(self, now: datetime) -> LedgerGauges:
        """Indexed reads only: counts per state (state, due_at), the oldest due pending (state, due_at),
        quarantined versions (a partial index on seen_version where problem is set)."""
        per_state = select(N.c.state, func.count()).group_by(N.c.state)
        oldest_due = select(func.min(N.c.due_at)).where(N.c.state == State.PENDING.value, N.c.due_at <= now)
        set_aside = select(S.c.source, func.count()).where(S.c.problem.is_not(None)).group_by(S.c.source)
        owed = (
            select(WB.c.kind, WB.c.state, func.count())
            .where(WB.c.state.in_(("pending", "refused")))
            .group_by(WB.c.kind, WB.c.state)
        )
        with self.engine.connect() as conn:
            found = {str(row[0]): int(row[1]) for row in conn.execute(per_state)}
            oldest = conn.execute(oldest_due).scalar()
            quarantined = {str(row[0]): int(row[1]) for row in conn.execute(set_aside)}
            write_backs = {(str(row[0]), str(row[1])): int(row[2]) for row in conn.execute(owed)}
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        return LedgerGauges(
            {state.value: found.get(state.value, 0) for state in State},
            max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0,
            quarantined,
            write_backs,
        )
