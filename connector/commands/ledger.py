"""The ledger commands of the CLI: `status`, `resolve`, `optout add|remove|list|rekey` and `db upgrade`.

Each opens the ledger (and nothing else: no secret but the ledger's is read), calls its roles directly,
synchronously (connector.ledger.sql), and closes it.
"""

from __future__ import annotations

from dataclasses import replace
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
    from connector.ledger.health import SqlHealth


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


def status(config: Config) -> dict[str, Any]:
    ledger = open_ledger(config)
    reports = ledger.reports
    try:
        return {
            "health": health_facts(config, ledger.health, datetime.now(UTC)),
            "counts": reports.counts(),
            "cursors": reports.cursors(),
            "attention": reports.notifications([State.IN_DOUBT, State.FAILED], 50),
            "suppressed": reports.notifications([State.SKIPPED, State.CANCELLED], 20),
            "problems": reports.problems(20),
            "quarantined": reports.quarantined(),
            "rejections": reports.rejections(),
            "write_back": ledger.write_backs.counts(),
            "write_back_problems": ledger.write_backs.problems(20),
            "bounces": ledger.bounces.entries(20),
        }
    finally:
        ledger.dispose()


def resolve(config: Config, key: str, decision: Literal["sent", "resend", "cancel"]) -> bool:
    """A person's decision on an in_doubt notification (`resend` also requeues a failed one). False when no
    notification with that key is in a state the decision applies to."""
    ledger = open_ledger(config)
    try:
        if decision == "resend":
            records = ledger.reports.existing([key])
            return bool(records) and ledger.after_send.resend(
                records[key].id, datetime.now(UTC), "resend ordered by an operator", [State.IN_DOUBT, State.FAILED]
            )
        state = State.SENT if decision == "sent" else State.CANCELLED
        return ledger.after_send.resolve(key, state, "resolved by an operator", [State.IN_DOUBT])
    finally:
        ledger.dispose()


def optout_add(config: Config, kind: optout.Kind, value: str, note: str | None) -> bool:
    """Put a patient (by identifier) or an address on the list; False when it is there already."""
    ledger = open_ledger(config)
    try:
        return ledger.optouts.add(kind, optout.digest(kind, value), optout.hint(kind, value), note)
    finally:
        ledger.dispose()


def optout_remove(config: Config, kind: optout.Kind, value: str) -> bool:
    ledger = open_ledger(config)
    try:
        return ledger.optouts.remove(kind, optout.digest(kind, value))
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
