"""`connector check`: touch everything the config names, send nothing, and say for each part whether it
works (connector.preflight judges each answer and prints nothing).

    config    parses; mappings and templates compile; every reference `run` reads can be read
    ledger    reachable, migrated to this version's head, writable (a row written in a transaction that is
              rolled back)
    sources   the SMART token (when configured), reachable, the CapabilityStatement, the strategy as the
              server declares it, and the first page of a poll read the way the strategy reads it
    paubox    the API key, by a receipt lookup of an id that cannot exist (404: accepted; 401/403: refused);
              the sender's domain
    smtp      (transport paubox-smtp) connect, STARTTLS, AUTH, QUIT
    webhooks  the public URLs configured for Subscriptions and CRMs answer a GET

Every probe is bounded by the config's timeouts and tried once (no retries): a preflight should answer
quickly. Nothing is sent, recorded or created (a SQLite file that does not exist is not created).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from sqlalchemy import Engine, insert, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from connector import preflight
from connector.commands.files import validate
from connector.errors import ConfigError, ConnectorError
from connector.ledger import migrate
from connector.ledger.health import describe, probe_engine
from connector.ledger.schema import ComponentHealthRow
from connector.logs import where
from connector.preflight import Check, skipped
from connector.sources.fhir_poll import FhirPollSource
from connector.urls import show_origin

if TYPE_CHECKING:
    from connector.config import Config
    from connector.config.sources import FhirPollSourceConfig
    from connector.fhir import SearchPage

LEDGER_TIMEOUT = 5.0  # seconds to connect to the ledger
WEBHOOK_TIMEOUT = 10.0


def _said(exc: ConnectorError) -> str:
    """An error in one line: a ConfigError's first problem (and how many more)."""
    if isinstance(exc, ConfigError) and exc.problems:
        more = len(exc.problems) - 1
        return str(exc.problems[0]) + (f" (and {more} more)" if more else "")
    return str(exc)


async def run(config_path: Path) -> list[Check]:
    """Every check, in a fixed order (config, ledger, each source, paubox, smtp, webhooks)."""
    try:
        checked = validate(config_path)
    except ConnectorError as exc:
        return [Check("config", "valid", False, _said(exc), "run `connector validate` to see every problem")]
    config = checked.config
    if checked.errors:
        checks = [
            Check(
                "config",
                "valid",
                False,
                f"{len(checked.errors)} problem(s), first: {checked.errors[0]}",
                "run `connector validate` to see every problem",
            )
        ]
    else:
        checks = [
            Check("config", "valid", True, f"{len(config.sources)} source(s), {len(checked.mappings)} mapping(s)")
        ]
    parts = await asyncio.gather(
        guarded("ledger", asyncio.to_thread(ledger_checks, config)),
        *(
            guarded(f"source {name}", source_checks(name, source, checked.tasks))
            for name, source in config.sources.items()
        ),
        guarded("paubox", paubox_checks(config)),
        guarded("smtp", smtp_checks(config)),
        guarded("webhooks", webhook_checks(config)),
    )
    for part in parts:
        checks += part
    return checks


async def guarded(part: str, probes: Awaitable[list[Check]]) -> list[Check]:
    """The checks of one part; an error nobody expected becomes a failed check of that part (located by
    type and place, not quoted: its text could carry what a server sent)."""
    try:
        return await probes
    except Exception as exc:  # noqa: BLE001 - one part's surprise must not hide the other parts' answers
        fix = "a bug in connector: report it with this line"
        return [Check(part, "checked", False, f"unexpected {where(exc)}", fix)]


# -- the ledger ------------------------------------------------------------------------------------------


def ledger_checks(config: Config) -> list[Check]:
    url = make_url(config.ledger_url)
    shown = url.render_as_string(hide_password=True)
    later = [skipped("ledger", "migrated", "the ledger is not reachable"), skipped("ledger", "writable", "as above")]
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        path = Path(url.database)
        if not path.parent.is_dir():
            fix = "create the folder, or point ledger.url at an existing one"
            return [
                Check("ledger", "reachable", False, f"the SQLite file's folder {path.parent} does not exist", fix),
                *later,
            ]
        if not path.exists():
            fix = "run `connector db upgrade` (it creates the file)"
            return [Check("ledger", "reachable", False, f"no SQLite file at {path}", fix), *later]
    engine = probe_engine(config.ledger_url, LEDGER_TIMEOUT)
    try:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except (SQLAlchemyError, OSError) as exc:
            fix = "check ledger.url, and that the database is running and accepts connections from here"
            return [Check("ledger", "reachable", False, f"{shown}: {describe(exc)}", fix), *later]
        checks = [Check("ledger", "reachable", True, shown)]
        current, head = migrate.current_revision(engine), migrate.head_revision()
        checks.append(preflight.revision(current, head, empty=not inspect(engine).get_table_names()))
        if current != head:
            return [*checks, skipped("ledger", "writable", "the schema is not at this version's head")]
        checks.append(_writable(engine))
        return checks
    finally:
        engine.dispose()


def _writable(engine: Engine) -> Check:
    """Write a health row in a transaction and roll it back: the database takes writes from this user."""
    table = ComponentHealthRow.__table__  # type: ignore[attr-defined]
    try:
        with engine.connect() as conn:
            transaction = conn.begin()
            conn.execute(
                insert(table).values(
                    component=f"check:{uuid.uuid4().hex[:12]}", state="check", updated_at=datetime.now(UTC)
                )
            )
            transaction.rollback()
    except (SQLAlchemyError, OSError) as exc:
        fix = "give the database user INSERT and UPDATE on the ledger's tables (SQLite: a writable file and folder)"
        return Check("ledger", "writable", False, describe(exc), fix)
    return Check("ledger", "writable", True, "a row written and rolled back")


# -- FHIR sources ----------------------------------------------------------------------------------------


async def source_checks(name: str, config: FhirPollSourceConfig, tasks: bool = False) -> list[Check]:
    """The checks of one FHIR source; the SMART token is asked for what `connector run` would ask for
    (`tasks`: with the scopes of hand-off Tasks), so a grant too narrow for the writes fails here."""
    part = f"source {name}"
    once = config.model_copy(update={"retries": config.retries.model_copy(update={"attempts": 1})})
    try:
        source = FhirPollSource(name, once, tasks=tasks)
    except ConnectorError as exc:
        return [Check(part, "auth", False, _said(exc), f"check sources.{name}.auth")]
    try:
        return await _source(source, part)
    finally:
        await source.aclose()


async def _source(source: FhirPollSource, part: str) -> list[Check]:
    name, config = source.name, source.config
    checks: list[Check] = []
    later = ("CapabilityStatement", f"strategy {config.strategy} declared", "one-page probe")
    if source.smart is not None:
        try:
            await source.smart.token()
        except ConnectorError as exc:
            fix = f"check sources.{name}.auth (client_id, key_id, private_key) against the EHR's registration"
            checks.append(Check(part, "SMART token", False, _said(exc), fix))
            return [*checks, *(skipped(part, what, "no token") for what in later)]
        checks.append(preflight.smart_token(name, source.smart.missing_scopes))
    try:
        reply = await source.exchange("GET", "metadata", None, "CapabilityStatement read")
    except (httpx.HTTPError, ConnectorError) as exc:
        problem = _said(exc) if isinstance(exc, ConnectorError) else type(exc).__name__
        fix = f"check sources.{name}.base_url, the network between here and the server, and that it is up"
        checks.append(Check(part, "reachable", False, f"{show_origin(config.base_url)}: {problem}", fix))
        return [*checks, *(skipped(part, what, "the server is not reachable") for what in later)]
    checks.append(Check(part, "reachable", True, f"{show_origin(config.base_url)} answered HTTP {reply.status_code}"))
    if reply.status_code in (401, 403):
        fix = f"check sources.{name}.auth"
        checks.append(Check(part, "auth", False, f"GET metadata answered HTTP {reply.status_code}", fix))
        return [*checks, *(skipped(part, what, "not authorised") for what in later)]
    statement = None
    if reply.status_code == 200:
        with contextlib.suppress(ValueError):
            statement = json.loads(reply.content)
    checks.append(preflight.capability(part, statement))
    checks.append(preflight.strategy_declared(name, config.strategy, statement))
    try:
        page = await first_page(source, datetime.now(UTC))
    except ConnectorError as exc:
        said = _said(exc)
        refused = " 401" in said or " 403" in said
        fix = f"check sources.{name}.auth" if refused else f"see sources.{name}.strategy"
        checks.append(Check(part, "auth" if refused else "one-page probe", False, said, fix))
        return checks
    count = len(page.matches) if page else 0
    checks.append(
        preflight.probe(name, config.strategy, page.self_url if page else None, count, config.on_ignored_filter)
    )
    if config.auth.type != "none":
        checks.append(Check(part, "auth", True, f"{config.auth.type} accepted (the probe read a page with it)"))
    return checks


async def first_page(source: FhirPollSource, now: datetime) -> SearchPage | None:
    """The first page a poll would read, the way its strategy reads it (the overlap back from now, or the
    configured date window)."""
    config = source.config
    since = now - max(config.overlap, timedelta(minutes=1))
    if config.strategy == "history":
        pages = source.history_pages(since)
    elif config.strategy == "date-window":
        pages = source.window_pages(now - config.window.past, now + config.window.future)
    else:
        pages = source.pages(since)
    try:
        return await anext(pages, None)
    finally:
        close = getattr(pages, "aclose", None)  # an async generator: stop the page read ahead
        if close is not None:
            await close()


# -- Paubox and the SMTP relay -----------------------------------------------------------------------------


async def paubox_checks(config: Config) -> list[Check]:
    from connector.delivery.paubox import PauboxRestMailer

    delivery = config.delivery
    checks: list[Check] = []
    if delivery.transport == "paubox-rest" or delivery.paubox.base_url or delivery.paubox.username:
        try:
            mailer = PauboxRestMailer(delivery.paubox, concurrency=1)
        except ConnectorError as exc:
            checks.append(Check("paubox", "API key", False, _said(exc), "set the variable or file it names"))
        else:
            try:
                status, is_json = await mailer.lookup(str(uuid.uuid4()))
                checks.append(preflight.paubox_key(status, is_json))
            except httpx.HTTPError as exc:
                where = show_origin(delivery.paubox.endpoint)
                fix = "check delivery.paubox.base_url, and that this machine may open HTTPS connections to it"
                checks.append(Check("paubox", "API key", False, f"{where}: {type(exc).__name__}", fix))
            finally:
                await mailer.aclose()
    checks.append(preflight.sender(delivery.from_address, delivery.reply_to))
    return checks


async def smtp_checks(config: Config) -> list[Check]:
    if config.delivery.transport != "paubox-smtp":
        return []
    from connector.delivery.smtp import PauboxSmtpMailer
    from connector.runtime import make_mailer

    smtp = config.delivery.smtp
    what, where = (
        "connect, STARTTLS, AUTH, QUIT" if smtp.security == "starttls" else "connect (TLS), AUTH, QUIT",
        f"{smtp.host}:{smtp.port}",
    )
    try:
        mailer = make_mailer(config)
    except (ConnectorError, OSError) as exc:
        said = _said(exc) if isinstance(exc, ConnectorError) else type(exc).__name__
        return [Check("smtp", what, False, said, "check delivery.smtp and delivery.paubox.api_key")]
    try:
        problem = await mailer.probe() if isinstance(mailer, PauboxSmtpMailer) else "not an SMTP mailer"
    finally:
        await mailer.aclose()
    if problem is not None:
        return [
            Check("smtp", what, False, f"{where}: {problem}", "check delivery.smtp (host, port, security, ca_file)")
        ]
    return [Check("smtp", what, True, where)]


# -- webhooks ----------------------------------------------------------------------------------------------


def public_urls(config: Config) -> list[tuple[str, str]]:
    """(part, URL) of every public URL the config gives for an endpoint of `connector run`."""
    urls = [
        (f"webhook {name} (subscription)", source.subscription.endpoint)
        for name, source in config.sources.items()
        if source.subscription.enabled and source.subscription.endpoint
    ]
    urls += [(f"webhook {name} (crm)", crm.public_url) for name, crm in config.crm.items() if crm.public_url]
    return urls


async def webhook_checks(config: Config) -> list[Check]:
    checks: list[Check] = []
    async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT, follow_redirects=False) as client:
        for part, url in public_urls(config):
            try:
                response = await client.get(url)
            except httpx.HTTPError as exc:
                fix = "check the URL, DNS, and that the proxy or load balancer in front of connector listens"
                checks.append(Check(part, "public URL", False, f"{show_origin(url)}: {type(exc).__name__}", fix))
                continue
            checks.append(preflight.public_url(part, response.status_code))
    return checks
