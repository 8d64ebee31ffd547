"""Wiring: build the ledger, sources, mailer, intake, sending and the endpoints' parts from a config.

intake    Planner (examine → decide → commit), Poller, SubscriptionHub, CrmIntake
sending   Dispatcher with one preparer per kind (Appointment, CrmEvent), Aftercare, WriteBack (EHR),
          PatientActions (links)
ledger    SqlLedger (sync, for start-up and the CLI) and its async face (`store`) for everything else
"""

from __future__ import annotations

import fcntl
import os
import ssl
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

import httpx
import structlog
from sqlalchemy.engine import make_url

from connector import metrics
from connector.config.handoff import handoff_to
from connector.crm.inbox import Keyring
from connector.delivery.paubox import PauboxRestMailer
from connector.errors import LedgerError
from connector.files import open_private
from connector.handoff import to_tasks
from connector.intake.crm import CrmIntake
from connector.intake.planner import Planner
from connector.intake.polling import Poller
from connector.intake.subscriptions import SubscriptionHub
from connector.ledger.aio import AsyncLedger
from connector.ledger.sql import SqlLedger, check_optouts, open_ledger, sqlite_folder
from connector.mapping.loader import MappingSet, load_mappings
from connector.metrics import Metrics
from connector.monitor import Monitor
from connector.sending.actions import PatientActions
from connector.sending.aftercare import Aftercare
from connector.sending.appointment import AppointmentPreparer
from connector.sending.cap import DailyCap
from connector.sending.crm import CrmPreparer
from connector.sending.crm_appointment import CrmAppointmentPreparer
from connector.sending.dispatch import Dispatcher
from connector.sending.writeback import WriteBack
from connector.sources.cache import ResourceCache
from connector.sources.fhir_poll import FhirPollSource

if TYPE_CHECKING:
    from connector.config import Config
    from connector.delivery import Mailer
    from connector.models import Clock
    from connector.sending.preparer import Preparer
    from connector.web.crm import CrmReceiver

log = structlog.get_logger("connector.runtime")


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
        from connector.delivery.smtp import PauboxSmtpMailer  # aiosmtplib only for this transport

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
    store: AsyncLedger
    sources: dict[str, FhirPollSource]
    mailer: Mailer
    cache: ResourceCache
    planner: Planner
    poller: Poller
    dispatcher: Dispatcher
    aftercare: Aftercare
    subscriptions: SubscriptionHub
    crm: CrmIntake | None
    crm_preparer: CrmPreparer | None
    crm_receiver: CrmReceiver | None
    lock: IO[str] | None
    metrics: Metrics
    monitor: Monitor
    write_back: WriteBack
    actions: PatientActions | None = None  # patients' links (`links:` in the config)

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
        handoff_transport: httpx.AsyncBaseTransport | None = None,
    ) -> Runtime:
        mappings = load_mappings(
            config.mappings_dir, [*config.sources, *config.crm], config.appointment_sources, handoff_to(config.handoff)
        )
        counted = metrics.install(Metrics())
        lock = lock_sqlite(config) if exclusive else None
        ledger = open_ledger(config)
        try:
            check_optouts(ledger.optouts)
        except LedgerError:
            ledger.dispose()
            if lock is not None:
                lock.close()
            raise
        if lock is not None:
            # This process alone uses the ledger: whatever is still `sending` was cut off by a crash.
            interrupted = ledger.outbox.mark_interrupted(datetime.now(UTC), everything=True)
            ledger.outbox.release(None)  # leases of a crashed process on notifications it never started
            if interrupted:
                log.warning("ledger.in_doubt", count=interrupted, problem="sends interrupted by an earlier crash")
        store = AsyncLedger.over(ledger)
        tasks = to_tasks(config.handoff, mappings)
        sources = {name: FhirPollSource(name, cfg, source_transport, tasks) for name, cfg in config.sources.items()}
        mailer = mailer or make_mailer(config)
        cache = ResourceCache(clock)
        owner = f"{os.uname().nodename[:24]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        planner = Planner(config, mappings, store.intake, cache, clock)
        poller = Poller(planner, store.intake, sources, clock)
        preparers: dict[str, Preparer] = {
            "Appointment": AppointmentPreparer(
                config,
                sources,
                cache,
                store.intake,
                store.optouts,
                store.bounces,
                ledger.optouts.optout_keys,
                store.links if config.links else None,
            )
        }
        crm = crm_preparer = receiver = None
        if config.crm and config.inbox is not None:
            from connector.web.crm import CrmReceiver  # Starlette's request parsing: only with CRM sources

            keyring = Keyring(config.inbox)
            crm = CrmIntake(config, mappings, store.inbox, keyring, clock, store.intake, crm_transport)
            crm_preparer = preparers["CrmEvent"] = CrmPreparer(
                config, store.inbox, store.optouts, keyring, crm_transport, store.links if config.links else None
            )
            preparers["CrmAppointment"] = CrmAppointmentPreparer(
                config,
                store.intake,
                store.inbox,
                store.optouts,
                keyring,
                crm_preparer.apis,
                store.bounces,
                ledger.optouts.optout_keys,
                store.links if config.links else None,
            )
            receiver = CrmReceiver(config, store.inbox, keyring, clock)
        cap = DailyCap(config, store.caps) if config.limits.per_patient_per_day is not None else None
        dispatcher = Dispatcher(config, mappings, store.outbox, preparers, planner, mailer, clock, owner, cap)
        aftercare = Aftercare(config, store.after_send, store.optouts, clock, store.bounces, ledger.optouts.optout_keys)
        hub = SubscriptionHub(config, planner, poller, sources, store.intake, clock)
        monitor = Monitor(config, store.health, counted, dispatcher.mailer_state)
        actions = PatientActions(config, sources, mappings, store.links) if config.links is not None else None
        write_back = WriteBack(config, mappings, store.write_backs, sources, clock, owner, handoff_transport)
        dispatcher.accepted = write_back.remember
        return cls(
            config,
            mappings,
            ledger,
            store,
            sources,
            mailer,
            cache,
            planner,
            poller,
            dispatcher,
            aftercare,
            hub,
            crm,
            crm_preparer,
            receiver,
            lock,
            counted,
            monitor,
            write_back,
            actions,
        )

    def load_mappings(self) -> MappingSet:
        """The mappings folder read and compiled again (SIGHUP). Raises ConfigError naming every problem."""
        config = self.config
        return load_mappings(
            config.mappings_dir, [*config.sources, *config.crm], config.appointment_sources, handoff_to(config.handoff)
        )

    async def aclose(self) -> None:
        await self.poller.aclose()
        await self.dispatcher.release()
        await self.write_back.release()
        for source in self.sources.values():
            await source.aclose()
        if self.crm_preparer is not None:
            await self.crm_preparer.aclose()
        if self.crm is not None:
            await self.crm.aclose()
        await self.mailer.aclose()
        await self.monitor.aclose()
        self.ledger.dispose()
        if self.lock is not None:
            self.lock.close()
