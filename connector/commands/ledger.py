"""The ledger commands of the CLI: `status`, `resolve`, `retry`, `optout add|remove|list|rekey` and `db upgrade`.

Each opens the ledger (and nothing else: no secret but the ledger's is read), calls its roles directly,
synchronously (connector.ledger.sql), and closes it.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from connector import health, optout
from connector.health import Finding, SourceFacts
from connector.ledger import OptOut, Rekeyed, migrate
from connector.ledger.engine import make_engine
from connector.ledger.sql import open_ledger, sqlite_folder, unreachable
from connector.models import State

if TYPE_CHECKING:
    from connector.config import Config
    from connector.ledger import NotificationRecord
    from connector.ledger.health import SqlHealth
    from connector.ledger.operator import Changed, Selection

Decision = Literal["sent", "resend", "cancel", "retry"]
# What each decision applies to: the states it changes from.
APPLIES: dict[Decision, tuple[State, ...]] = {
    "sent": (State.IN_DOUBT,),
    "cancel": (State.IN_DOUBT,),
    "resend": (State.IN_DOUBT, State.FAILED),
    "retry": (State.FAILED,),
}
REASONS: dict[Decision, str] = {
    "sent": "resolved by an operator: it was sent",
    "cancel": "resolved by an operator: cancelled",
    "resend": "resend ordered by an operator",
    "retry": "retry ordered by an operator",
}


def health_facts(config: Config, store: SqlHealth, now: datetime) -> list[Finding]:
    """What the daemons last wrote of each source and of the mailer, judged as `/healthz` judges them (the
    ledger answered: this process reads it)."""
    url = make_url(config.ledger_url).render_as_string(hide_password=True)
    findings = [Finding("ledger", True, None, None, {"url": url})]
    rows = store.sources()
    for name, source in config.sources.items():
        findings.append(
            health.source_finding(name, rows.get(name, SourceFacts()), source.interval, config.health, now, None)
        )
    mailer = store.mailer()
    if mailer is None:
        findings.append(Finding("mailer", True, None, "no daemon has reported on it yet"))
    else:
        facts, reported = mailer
        finding = health.mailer_finding(facts)
        findings.append(replace(finding, details={**finding.details, "reported_at": reported}))
    return findings


STATUS_STEPS = (
    "health",
    "counts",
    "cursors",
    "attention",
    "suppressed",
    "problems",
    "quarantined",
    "rejections",
    "write_back",
    "write_back_problems",
    "bounces",
)


def status(config: Config, step: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """What `connector status` shows; `step` is told the name of each query as it starts (a progress bar)."""
    ledger = open_ledger(config)
    reports = ledger.reports
    queries: dict[str, Callable[[], Any]] = {
        "health": lambda: health_facts(config, ledger.health, datetime.now(UTC)),
        "counts": reports.counts,
        "cursors": reports.cursors,
        "attention": lambda: reports.notifications([State.IN_DOUBT, State.FAILED], 50),
        "suppressed": lambda: reports.notifications([State.SKIPPED, State.CANCELLED], 20),
        "problems": lambda: reports.problems(20),
        "quarantined": reports.quarantined,
        "rejections": reports.rejections,
        "write_back": ledger.write_backs.counts,
        "write_back_problems": lambda: ledger.write_backs.problems(20),
        "bounces": lambda: ledger.bounces.entries(20),
    }
    found: dict[str, Any] = {}
    try:
        for name in STATUS_STEPS:
            step(name)
            found[name] = queries[name]()
        return found
    finally:
        ledger.dispose()


@dataclass(frozen=True)
class Preview:
    """What a decision would change: counts per state, the first notifications, and how many of the
    notifications named by id or key are not in a state it applies to."""

    counts: dict[State, int]
    first: list[NotificationRecord]
    not_applicable: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def preview(config: Config, selection: Selection, decision: Decision, limit: int = 20) -> Preview:
    ledger = open_ledger(config)
    try:
        states = APPLIES[decision]
        counts = ledger.operator.count(selection, states)
        others = sum(ledger.operator.count(selection).values()) - sum(counts.values()) if selection.by_name else 0
        return Preview(counts, ledger.operator.page(selection, None, limit, states), others)
    finally:
        ledger.dispose()


def decide(config: Config, selection: Selection, decision: Decision) -> Changed:
    """Apply a person's decision to every selected notification it applies to, in one transaction."""
    ledger = open_ledger(config)
    try:
        actor = f"cli:{_user()}"
        states, reason = APPLIES[decision], REASONS[decision]
        if decision in ("resend", "retry"):
            return ledger.operator.requeue(selection, datetime.now(UTC), states, actor, reason)
        to_state = State.SENT if decision == "sent" else State.CANCELLED
        return ledger.operator.settle(selection, to_state, states, actor, reason)
    finally:
        ledger.dispose()


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def optout_add(config: Config, kind: optout.Kind, value: str, note: str | None, category: str = "") -> bool:
    """Put a patient (by identifier) or an address on the list (by an operator), for every email or one
    category; False when it is there already."""
    ledger = open_ledger(config)
    try:
        return ledger.optouts.add(kind, optout.digest(kind, value), optout.hint(kind, value), note, category)
    finally:
        ledger.dispose()


def optout_remove(config: Config, kind: optout.Kind, value: str, category: str | None = None) -> bool:
    ledger = open_ledger(config)
    try:
        return ledger.optouts.remove(kind, optout.digest(kind, value), category)
    finally:
        ledger.dispose()


def optout_list(config: Config) -> list[OptOut]:
    ledger = open_ledger(config)
    try:
        return ledger.optouts.entries()
    finally:
        ledger.dispose()


def optout_rekey(config: Config) -> Rekeyed:
    ledger = open_ledger(config)
    try:
        return ledger.optouts.rekey()
    finally:
        ledger.dispose()


def db_upgrade(config: Config) -> tuple[str | None, str]:
    """Create or migrate the ledger schema; (revision before, revision after)."""
    sqlite_folder(config)
    engine = make_engine(config.ledger_url)
    try:
        return migrate.upgrade(engine)
    except OperationalError as exc:
        raise unreachable(config, exc) from exc
    finally:
        engine.dispose()
