"""SqlLedger: the ledger on SQLite (one process, WAL) or PostgreSQL (several processes), one engine shared
by its roles, and how a config opens it.

    ledger.intake      pages, seen versions, states, cursor, poll lock, subscriptions   (SqlIntake)
    ledger.outbox      claims, sending, outcomes, leases                                (SqlOutbox)
    ledger.after_send  webhooks, delivery statuses, receipts, doubt, resends, resolve   (SqlAfterSend)
    ledger.inbox       sealed CRM events                                                (SqlInbox)
    ledger.optouts     keyed opt-out digests                                            (SqlOptOuts)
    ledger.links       patients' links: where emails went (keyed), unsubscribe, withdraw (SqlPatientLinks)
    ledger.reports     counts and listings for status, dry runs and replays             (SqlReports)
    ledger.health      the health rows of the daemon                                    (SqlHealth)
    ledger.operator    a person's selections and bulk settle / requeue, recorded        (SqlOperator)
    ledger.console     the operator console's searches, charts, actions and audit       (SqlConsole)
    ledger.journal     what happened to each notification and appointment, purged       (SqlJournal)
    ledger.write_backs writes owed to the EHR (Communications), their retries          (SqlWriteBacks)
    ledger.caps        emails per patient in a day, deferrals (the daily cap)           (SqlCaps)
    ledger.bounces     addresses suppressed per patient after bounces                   (SqlBounces)

The roles are synchronous: the CLI's ledger commands call them directly, and the daemon's async code
reaches them through connector.ledger.aio (the one place that crosses into threads), typed by the
Protocols of connector.ledger.abc. Only the wiring (connector.runtime, connector.commands) builds this.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from connector.errors import LedgerError
from connector.ledger import migrate
from connector.ledger.after_send import SqlAfterSend
from connector.ledger.bounces import SqlBounces
from connector.ledger.caps import SqlCaps
from connector.ledger.console import SqlConsole
from connector.ledger.engine import make_engine
from connector.ledger.health import SqlHealth, describe
from connector.ledger.inbox import SqlInbox
from connector.ledger.intake import SqlIntake
from connector.ledger.journal import SqlJournal
from connector.ledger.operator import SqlOperator
from connector.ledger.optouts import SqlOptOuts
from connector.ledger.outbox import SqlOutbox
from connector.ledger.patient_links import SqlPatientLinks
from connector.ledger.reports import SqlReports
from connector.ledger.writeback import SqlWriteBacks
from connector.optout import OptOutKeys

if TYPE_CHECKING:
    from connector.config import Config

log = structlog.get_logger("connector.runtime")


class SqlLedger:
    def __init__(self, engine: Engine, optout_keys: OptOutKeys | None = None) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.intake = SqlIntake(engine)
        self.outbox = SqlOutbox(engine)
        self.after_send = SqlAfterSend(engine)
        self.inbox = SqlInbox(engine)
        self.optouts = SqlOptOuts(engine, optout_keys)
        self.reports = SqlReports(engine)
        self.health = SqlHealth(engine)
        self.operator = SqlOperator(engine)
        self.console = SqlConsole(engine)
        self.journal = SqlJournal(engine)
        self.links = SqlPatientLinks(engine)
        self.write_backs = SqlWriteBacks(engine)
        self.caps = SqlCaps(engine)
        self.bounces = SqlBounces(engine)

    def dispose(self) -> None:
        self.engine.dispose()


def open_ledger(config: Config) -> SqlLedger:
    """The ledger, its schema checked (or created when empty). An unreachable database or a missing SQLite
    folder is a LedgerError that says what to do."""
    sqlite_folder(config)
    engine = make_engine(config.ledger_url)
    try:
        migrate.ensure_current(engine)
    except OperationalError as exc:
        engine.dispose()
        raise unreachable(config, exc) from exc
    return SqlLedger(engine, OptOutKeys.from_config(config.optout))


def check_optouts(optouts: SqlOptOuts) -> None:
    """Opt-outs keyed with a key no longer in `optout.keys` would match nobody: refuse to go on. Unkeyed ones
    (written before keys existed) still match; say how to key them."""
    counts = optouts.key_counts()
    keys = optouts.optout_keys
    unknown = sorted(k for k in counts if k is not None and (keys is None or k not in keys.keys))
    if unknown:
        raise LedgerError(
            f"{sum(counts[k] for k in unknown)} opt-out(s) are keyed with {', '.join(unknown)}, which "
            "optout.keys no longer lists: they would match nobody. Put the key(s) back in optout.keys"
        )
    if counts.get(None):
        log.warning(
            "optout.unkeyed",
            count=counts[None],
            problem="opt-outs stored as plain SHA-256 digests; "
            + ("run `connector optout rekey`" if keys else "configure optout.keys, then run `connector optout rekey`"),
        )


def unreachable(config: Config, exc: OperationalError) -> LedgerError:
    safe = make_url(config.ledger_url).render_as_string(hide_password=True)
    return LedgerError(
        f"cannot reach the ledger at {safe} ({describe(exc)}): check ledger.url and that the "
        f"database is running and accepts connections"
    )


def sqlite_folder(config: Config) -> None:
    url = make_url(config.ledger_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        folder = Path(url.database).parent
        if not folder.is_dir():
            raise LedgerError(
                f"the folder of the SQLite ledger does not exist: {folder} (ledger.url): create it, "
                f"or point ledger.url to an existing folder"
            )
