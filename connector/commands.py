"""What each CLI command does, apart from parsing arguments (cli.py) and printing (report.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from connector import config as configuration
from connector import fhir, health
from connector.config import Config, load_config
from connector.daemon import run_forever, run_once
from connector.delivery import Outcome, Verdict
from connector.errors import ConfigError, ConnectorError, Problem
from connector.health import Finding, SourceFacts
from connector.intake import examine, triples
from connector.ledger.health import HealthStore
from connector.lifecycle import appointment_zone
from connector.mapping.engine import render
from connector.mapping.loader import load_mappings
from connector.models import Clock, Email, State, system_clock
from connector.recipients import NoRecipient, optout_lookup, resolve
from connector.replay import pages_between, replan
from connector.results import CycleReport, DryRun, Replay, Replayed, ReplayItem
from connector.runtime import Runtime


@dataclass(frozen=True)
class Validation:
    config: Config
    mappings: list[str]
    errors: list[Problem]  # mappings, templates, and the references `run` needs but cannot read
    warnings: list[Problem]  # missing references of features that are off


def validate(config_path: Path) -> Validation:
    """Check config, mappings and templates, and every environment variable and secret file the config
    refers to. A config file that does not parse raises ConfigError."""
    config = load_config(config_path, needs=())
    errors, warnings = configuration.report(config)
    try:
        names = load_mappings(config.mappings_dir, [*config.sources, *config.crm]).names()
    except ConfigError as exc:
        names, errors = [], [*exc.problems, *errors]
    return Validation(config, names, errors, warnings)


class NoMailer:
    """The mailer of commands that never send (dry runs, subscribe): Paubox's key is not read."""

    async def send(self, email: Email) -> Outcome:
        return Outcome(Verdict.RETRY, "not sent: this command does not send", blocking=True)

    async def aclose(self) -> None:
        return None


async def run(config: Config, clock: Clock, once: bool) -> CycleReport | None:
    configuration.require(config)  # every secret of what runs, now rather than at the first send
    runtime = Runtime.open(config, clock)
    try:
        if once:
            return await run_once(runtime)
        await run_forever(runtime)
        return None
    finally:
        await runtime.aclose()


async def explain(runtime: Runtime, items: list[ReplayItem], now: datetime) -> dict[str, str]:
    """For each notification that would be sent: 'would send', or why the recipient rules say no."""
    verdicts: dict[str, str] = {}
    opted_out = optout_lookup(runtime.ledger)
    for item in items:
        n = item.notification
        if item.existing is not None or n.state is not State.PENDING or not n.patient_id:
            continue
        source = runtime.sources[n.source]
        try:
            found = await resolve(
                n.patient_id,
                source=source,
                cache=runtime.cache,
                opted_out=opted_out,
                consent=source.config.consent,
                now=now,
            )
        except ConnectorError as exc:
            verdicts[n.key] = f"unknown: {exc}"
            continue
        when = "now" if n.due_at <= now else n.due_at.isoformat(timespec="minutes")
        verdicts[n.key] = f"skipped: {found.reason}" if isinstance(found, NoRecipient) else f"would send ({when})"
    return verdicts


async def dry_run(config: Config, clock: Clock) -> DryRun:
    """Read the sources as the next poll would, plan, check recipients, and commit nothing."""
    runtime = Runtime.open(config, clock, exclusive=False, mailer=NoMailer())
    found = Replay()
    errors: list[str] = []
    try:
        for name, source in runtime.sources.items():
            cursor = await asyncio.to_thread(runtime.ledger.cursor, name)
            try:
                since = runtime.planner.since(name, cursor) if source.config.strategy != "date-window" else None
                pages = [page async for page in pages_between(runtime.planner, name, since, None)]
            except ConnectorError as exc:
                errors.append(str(exc))
                continue
            for page in pages:
                fresh = await asyncio.to_thread(runtime.ledger.new_versions, name, triples(page))
                page.matches = [m for m, triple in zip(page.matches, triples(page), strict=True) if triple in fresh]
                runtime.planner.remember(name, page)
            found += await replan(runtime.planner, name, pages, dry_run=True, first_sight=False)
        verdicts = await explain(runtime, found.items, clock())
        due = await asyncio.to_thread(runtime.ledger.due, clock(), 1000)
        return DryRun(found.items, found.notes, verdicts, due, errors, found.quarantined)
    finally:
        await runtime.aclose()


async def replay(
    config: Config,
    clock: Clock,
    source: str,
    since: datetime | None,
    until: datetime | None,
    file: Path | None,
    dry: bool,
) -> Replayed:
    """Plan a window of a source (or a file) again and send what the ledger does not already hold."""
    runtime = Runtime.open(config, clock, exclusive=not dry, mailer=NoMailer() if dry else None)
    try:
        if source in config.crm:
            return await _replay_crm(runtime, source, since, until, dry)
        if file:
            page = read_resource_file(file)
            runtime.planner.remember(source, page)
            pages: Any = [page]
        else:
            pages = pages_between(runtime.planner, source, since, until)
        found = await replan(runtime.planner, source, pages, dry_run=dry)
        verdicts = await explain(runtime, found.items, clock()) if dry else {}
        if not dry:
            await runtime.dispatcher.run()
        final = await asyncio.to_thread(runtime.ledger.existing, [i.notification.key for i in found.items])
        return Replayed(found.items, found.notes, verdicts, final, found.quarantined)
    finally:
        await runtime.aclose()


async def _replay_crm(
    runtime: Runtime, source: str, since: datetime | None, until: datetime | None, dry: bool
) -> Replayed:
    """The stored inbox events of a window, planned again; the ledger's keys suppress what exists."""
    assert runtime.crm is not None
    found, quarantined = await runtime.crm.replay(source, since, until)
    planned = list({p.key: p for p in found}.values())
    existing = await asyncio.to_thread(runtime.ledger.existing, [p.key for p in planned])
    inserted: set[str] = set()
    if not dry:
        inserted = set(await asyncio.to_thread(runtime.ledger.inbox_commit, [], planned, quarantined))
        await runtime.dispatcher.run()
    items = [ReplayItem(p, existing.get(p.key), p.key in inserted) for p in planned]
    final = await asyncio.to_thread(runtime.ledger.existing, [p.key for p in planned])
    return Replayed(items, [], {}, final, quarantined)


def read_resource_file(path: Path) -> fhir.SearchPage:
    """A Bundle, a single resource, or NDJSON (one resource per line) → one page of resources."""
    text = path.read_text(encoding="utf-8")
    try:
        documents = [json.loads(text)]
    except ValueError:
        documents = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                documents.append(json.loads(line))
            except ValueError:
                raise ConfigError([Problem(path, number, "", "line is not valid JSON")]) from None
    page = fhir.SearchPage()
    for resource in _flatten(documents):
        if resource.get("resourceType") == "Appointment":
            page.matches.append(resource)
        elif resource.get("id"):
            page.included[f"{resource.get('resourceType')}/{resource['id']}"] = resource
    if not page.matches:
        raise ConfigError([Problem(path, None, "", "no Appointment resources in the file")])
    return page


def _flatten(documents: list[Any]) -> Iterator[dict[str, Any]]:
    for document in documents:
        if isinstance(document, dict) and document.get("resourceType") == "Bundle":
            yield from _flatten([e.get("resource") for e in document.get("entry") or [] if isinstance(e, dict)])
        elif isinstance(document, dict):
            yield document


def render_file(
    mappings_dir: Path,
    mapping_name: str,
    resource_file: Path,
    patient_file: Path | None,
    timezone: str,
    locale: str,
    now: datetime,
    default_from: str,
) -> Email:
    """Render one mapping for an Appointment (and its Patient) read from files."""
    mappings = load_mappings(mappings_dir)
    mapping = mappings.get(mapping_name)
    if mapping is None:
        raise ConfigError(
            [
                Problem(
                    mappings_dir,
                    None,
                    "",
                    f"no mapping named {mapping_name!r}; there are: {', '.join(mappings.names())}",
                )
            ]
        )
    page = read_resource_file(resource_file)
    examined = examine(page, None)
    if any(s.problem for s in examined.seen):
        raise ConfigError([Problem(resource_file, None, "", s.problem or "") for s in examined.seen if s.problem])
    appointment = page.matches[0]
    patient_ids = fhir.patient_participants(appointment)
    if patient_file:
        patient = json.loads(patient_file.read_text(encoding="utf-8"))
    else:
        patient = next(
            (page.included.get(f"Patient/{p}") for p in patient_ids if f"Patient/{p}" in page.included), None
        )
    if patient is None:
        raise ConfigError(
            [
                Problem(
                    resource_file,
                    None,
                    "",
                    "no Patient for the appointment: put it in the Bundle or give --patient FILE",
                )
            ]
        )
    address = fhir.choose_email(patient, now) or "patient@example.org"
    return render(
        mapping,
        key=f"render:{mapping_name}:{appointment.get('id')}",
        to=address,
        appointment=appointment,
        patient=patient,
        event=mapping.spec.trigger.event[0],
        source="file",
        timezone=appointment_zone(appointment, {}, timezone),
        locale=locale,
        languages=fhir.preferred_languages(patient),
        now=now,
        default_from=default_from,
        default_reply_to=None,
    )


def health_facts(config: Config, store: HealthStore, now: datetime) -> list[Finding]:
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
    from connector.runtime import open_ledger

    ledger = open_ledger(config)
    try:
        return {
            "health": health_facts(config, HealthStore(ledger.engine), datetime.now(UTC)),
            "counts": ledger.counts(),
            "cursors": ledger.cursors(),
            "attention": ledger.notifications([State.IN_DOUBT, State.FAILED], 50),
            "suppressed": ledger.notifications([State.SKIPPED, State.CANCELLED], 20),
            "problems": ledger.problems(20),
            "quarantined": ledger.quarantined(),
            "rejections": ledger.rejections(),
        }
    finally:
        ledger.engine.dispose()


async def subscribe(config: Config, source: str) -> tuple[str, str]:
    runtime = Runtime.open(config, system_clock, exclusive=False, mailer=NoMailer())
    try:
        return await runtime.subscriptions.subscribe(source)
    finally:
        await runtime.aclose()
