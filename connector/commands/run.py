"""Commands that run the daemon's parts: `connector run` (once, for ever, or as a dry run), `replay` and
`subscribe`. Each opens a Runtime, calls into it, and returns a result value (connector.results)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connector import config as configuration
from connector import optout
from connector.bounces import skip_reason
from connector.commands.files import read_resource_file
from connector.daemon import run_forever, run_once
from connector.delivery import Outcome, Verdict
from connector.errors import ConnectorError
from connector.intake.checks import triples
from connector.intake.replay import pages_between, replan
from connector.models import Clock, Email, State, system_clock
from connector.results import CycleReport, DryRun, Replay, Replayed, ReplayItem, Tracker, Untracked
from connector.runtime import Runtime
from connector.sending.recipients import NoRecipient, optout_lookup, resolve

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from connector import fhir
    from connector.config import Config

NOBODY = Untracked()


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


async def explain(
    runtime: Runtime, items: list[ReplayItem], now: datetime, tracker: Tracker = NOBODY
) -> dict[str, str]:
    """For each notification that would be sent: 'would send', or why the recipient rules say no (the opt-outs
    of its mapping's `category:` included, and an essential mapping's exemption from unsubscribe links)."""
    verdicts: dict[str, str] = {}
    opted_out = optout_lookup(runtime.store.optouts)
    tracker.phase("checking recipients", len(items))
    for item in items:
        tracker.advance()
        n = item.notification
        if item.existing is not None or n.state is not State.PENDING or not n.patient_id:
            continue
        source = runtime.sources[n.source]
        mapping = runtime.mappings.get(n.mapping)
        try:
            found = await resolve(
                n.patient_id,
                source=source,
                cache=runtime.cache,
                opted_out=opted_out,
                consent=source.config.consent,
                now=now,
                category=mapping.spec.category if mapping else None,
                essential=mapping.spec.essential if mapping else False,
            )
        except ConnectorError as exc:
            verdicts[n.key] = f"unknown: {exc}"
            continue
        when = "now" if n.due_at <= now else n.due_at.isoformat(timespec="minutes")
        if isinstance(found, NoRecipient):
            verdicts[n.key] = f"skipped: {found.reason}"
            continue
        bounced = await bounced_address(runtime, n.source, n.patient_id, found.address)
        verdicts[n.key] = f"skipped: {bounced}" if bounced else f"would send ({when})"
    return verdicts


async def bounced_address(runtime: Runtime, source: str, patient_id: str, address: str) -> str | None:
    """Why the address would be skipped as bounced (connector.bounces), or None."""
    if not runtime.config.bounces.suppress:
        return None
    digests = [d for _, d in optout.variants(runtime.ledger.optouts.optout_keys, optout.digest("email", address))]
    tally = await runtime.store.bounces.suppressed(source, patient_id, digests)
    return skip_reason(patient_id, tally) if tally is not None else None


async def dry_run(config: Config, clock: Clock, tracker: Tracker = NOBODY) -> DryRun:
    """Read the sources as the next poll would, plan, check recipients, and commit nothing."""
    runtime = Runtime.open(config, clock, exclusive=False, mailer=NoMailer())
    found = Replay()
    errors: list[str] = []
    try:
        for name, source in runtime.sources.items():
            cursor = await runtime.store.intake.cursor(name)
            try:
                since = runtime.poller.since(name, cursor) if source.config.strategy != "date-window" else None
                tracker.phase(f"reading {name} (appointments)")
                pages = [page async for page in _counted(pages_between(runtime.poller, name, since, None), tracker)]
            except ConnectorError as exc:
                errors.append(str(exc))
                continue
            for page in pages:
                fresh = await runtime.store.intake.new_versions(name, triples(page))
                page.matches = [m for m, triple in zip(page.matches, triples(page), strict=True) if triple in fresh]
                runtime.planner.remember(name, page)
            found += await replan(runtime.planner, runtime.store.reports, name, pages, dry_run=True, first_sight=False)
        verdicts = await explain(runtime, found.items, clock(), tracker)
        due = await runtime.store.reports.due(clock(), 1000)
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
    tracker: Tracker = NOBODY,
) -> Replayed:
    """Plan a window of a source (or a file) again and send what the ledger does not already hold; the
    tracker is told of each page read, each recipient checked, and the sending."""
    runtime = Runtime.open(config, clock, exclusive=not dry, mailer=NoMailer() if dry else None)
    try:
        if source in config.crm:
            return await replay_crm(runtime, source, since, until, dry)
        if file:
            page = read_resource_file(file)
            runtime.planner.remember(source, page)
            pages: Any = [page]
        else:
            pages = _counted(pages_between(runtime.poller, source, since, until), tracker)
            tracker.phase(f"reading {source} (appointments)")
        found = await replan(runtime.planner, runtime.store.reports, source, pages, dry_run=dry)
        verdicts = await explain(runtime, found.items, clock(), tracker) if dry else {}
        if not dry:
            tracker.phase("sending what is due")
            await runtime.dispatcher.run()
        final = await runtime.store.reports.existing([i.notification.key for i in found.items])
        return Replayed(found.items, found.notes, verdicts, final, found.quarantined)
    finally:
        await runtime.aclose()


async def _counted(pages: AsyncIterator[fhir.SearchPage], tracker: Tracker) -> AsyncIterator[fhir.SearchPage]:
    async for page in pages:
        tracker.advance(len(page.matches))
        yield page


async def replay_crm(
    runtime: Runtime, source: str, since: datetime | None, until: datetime | None, dry: bool
) -> Replayed:
    """The stored inbox events of a window, planned again; the ledger's keys suppress what exists."""
    assert runtime.crm is not None
    # A replay that records decides while no replica processes the inbox (appointment withdrawals).
    lock = await runtime.crm.lock_inbox() if not dry else None
    try:
        found, quarantined = await runtime.crm.replay(source, since, until)
        planned = list({p.key: p for p in found}.values())
        existing = await runtime.store.reports.existing([p.key for p in planned])
        inserted: set[str] = set()
        if not dry:
            inserted = set(await runtime.store.inbox.commit([], planned, quarantined))
    finally:
        if lock is not None:
            await runtime.crm.unlock_inbox(lock)
    if not dry:
        await runtime.dispatcher.run()
    items = [ReplayItem(p, existing.get(p.key), p.key in inserted) for p in planned]
    final = await runtime.store.reports.existing([p.key for p in planned])
    return Replayed(items, [], {}, final, quarantined)


async def subscribe(config: Config, source: str) -> tuple[str, str]:
    runtime = Runtime.open(config, system_clock, exclusive=False, mailer=NoMailer())
    try:
        return await runtime.subscriptions.subscribe(source)
    finally:
        await runtime.aclose()
