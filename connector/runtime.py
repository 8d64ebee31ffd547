"""Wiring: build the ledger, sources, mailer, planner and dispatcher from a config."""

from __future__ import annotations

import fcntl
import os
import ssl
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import httpx
import structlog
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from connector import metrics
from connector.aftercare import Aftercare
from connector.cache import ResourceCache
from connector.config import Config
from connector.crm.inbox import Keyring
from connector.crm.processor import CrmProcessor
from connector.crm.receiver import CrmReceiver
from connector.delivery import Mailer
from connector.delivery.paubox import PauboxRestMailer
from connector.delivery.smtp import PauboxSmtpMailer
from connector.dispatch import Dispatcher
from connector.errors import LedgerError
from connector.files import open_private
from connector.ledger import migrate
from connector.ledger.health import HealthStore, describe
from connector.ledger.sql import SqlLedger, make_engine
from connector.mapping.loader import MappingSet, load_mappings
from connector.metrics import Metrics
from connector.models import Clock
from connector.monitor import Monitor
from connector.optout import OptOutKeys
from connector.pipeline import Planner
from connector.sources.fhir_poll import FhirPollSource
from connector.sources.subscriptions import SubscriptionHub

log = structlog.get_logger("connector.runtime")


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


def check_optouts(ledger: SqlLedger) -> None:
    """Opt-outs keyed with a key no longer in `optout.keys` would match nobody: refuse to go on. Unkeyed ones
    (written before keys existed) still match; say how to key them."""
    counts = ledger.optout_key_counts()
    keys = ledger.optout_keys
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


def lock_sqlite(config: Config) -> IO[str] | None:
    """SQLite ledgers serve one process: hold an exclusive lock beside the database file."""
    url = make_url(config.ledger_url)
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    sqlite_folder(config)
    handle = open_private(Path(url.database + ".lock"), "a")  # held open for the life of the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise LedgerError(
            f"another connector process is using the SQLite ledger {url.database}; stop it first "
            f"(several daemons need a PostgreSQL ledger)"
        ) from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def make_mailer(config: Config) -> Mailer:
    delivery = config.delivery
    if delivery.transport == "paubox-smtp":
        smtp = delivery.smtp
        ca_file = smtp.ca_file if smtp.ca_file is None or smtp.ca_file.is_absolute() else config.base_dir / smtp.ca_file
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        return PauboxSmtpMailer(
            host=smtp.host,
            port=smtp.port,
            security=smtp.security,
            username=smtp.username,
            password=delivery.paubox.api_key.get_secret_value(),
            timeout=smtp.timeout.total_seconds(),
            tls_context=context,
            max_connections=smtp.max_connections,
        )
    return PauboxRestMailer(delivery.paubox, concurrency=config.dispatch.concurrency)


@dataclass
class Runtime:
    config: Config
    mappings: MappingSet
    ledger: SqlLedger
    sources: dict[str, FhirPollSource]
    mailer: Mailer
    cache: ResourceCache
    planner: Planner
    dispatcher: Dispatcher
    aftercare: Aftercare
    subscriptions: SubscriptionHub
    crm: CrmProcessor | None
    crm_receiver: CrmReceiver | None
    lock: IO[str] | None
    metrics: Metrics
    monitor: Monitor

    @classmethod
    def open(
        cls,
        config: Config,
        clock: Clock,
        *,
        mailer: Mailer | None = None,
        source_transport: httpx.AsyncBaseTransport | None = None,
        exclusive: bool = True,
        crm_transport: httpx.AsyncBaseTransport | None = None,
    ) -> Runtime:
        mappings = load_mappings(config.mappings_dir, [*config.sources, *config.crm])
        counted = metrics.install(Metrics())
        lock = lock_sqlite(config) if exclusive else None
        ledger = open_ledger(config)
        try:
            check_optouts(ledger)
        except LedgerError:
            ledger.engine.dispose()
            if lock is not None:
                lock.close()
            raise
        if lock is not None:
            # This process alone uses the ledger: whatever is still `sending` was cut off by a crash.
            interrupted = ledger.mark_interrupted(datetime.now(UTC), everything=True)
            ledger.release(None)  # leases of a crashed process on notifications it never started
            if interrupted:
                log.warning("ledger.in_doubt", count=interrupted, problem="sends interrupted by an earlier crash")
        sources = {name: FhirPollSource(name, cfg, source_transport) for name, cfg in config.sources.items()}
        mailer = mailer or make_mailer(config)
        cache = ResourceCache(clock)
        owner = f"{os.uname().nodename[:24]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        planner = Planner(config, mappings, ledger, sources, cache, clock)
        dispatcher = Dispatcher(config, mappings, ledger, sources, mailer, cache, clock, owner, planner.deleted)
        aftercare = Aftercare(config, ledger, clock)
        hub = SubscriptionHub(config, planner, sources, ledger, clock)
        crm = receiver = None
        if config.crm and config.inbox is not None:
            keyring = Keyring(config.inbox)
            crm = dispatcher.crm = CrmProcessor(config, mappings, ledger, keyring, clock, crm_transport)
            receiver = CrmReceiver(config, ledger, keyring, clock)
        monitor = Monitor(config, HealthStore(ledger.engine), counted, dispatcher.mailer_state)
        return cls(
            config,
            mappings,
            ledger,
            sources,
            mailer,
            cache,
            planner,
            dispatcher,
            aftercare,
            hub,
            crm,
            receiver,
            lock,
            counted,
            monitor,
        )

    async def aclose(self) -> None:
        await self.dispatcher.release()
        for source in self.sources.values():
            await source.aclose()
        if self.crm is not None:
            await self.crm.aclose()
        await self.mailer.aclose()
        await self.monitor.aclose()
        self.ledger.engine.dispose()
        if self.lock is not None:
            self.lock.close()
