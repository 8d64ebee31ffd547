"""Replays and dry runs: read a window of a source (or a file) again and plan it with the mappings. The
ledger's keys keep what it already holds from being added twice; neither the cursor nor the remembered
states move. Versions that cannot be processed are listed as quarantined, with the reason."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from connector import fhir
from connector.intake.checks import examine
from connector.intake.decide import recorded
from connector.results import Replay, ReplayItem

if TYPE_CHECKING:
    from connector.intake.planner import Planner
    from connector.intake.polling import Poller
    from connector.ledger.abc import Reports


async def pages_between(
    poller: Poller, name: str, since: datetime | None, until: datetime | None
) -> AsyncIterator[fhir.SearchPage]:
    """The appointments a replay or dry run reads, the way the source is configured: changed in
    [since, until] (last-updated, history), or starting in [since, until] (date-window; default the
    configured window). Deletions are left out: they are not replayed."""
    source = poller.sources[name]
    strategy = source.config.strategy
    if strategy == "last-updated":
        async for page in source.pages(since, until):
            yield page
    elif strategy == "history":
        async for page in source.history_pages(since):
            page.matches = [
                m
                for m in page.matches
                if not m.get("_deleted") and (until is None or (fhir.last_updated(m) or until) <= until)
            ]
            yield page
    else:
        now = poller.clock()
        window = source.config.window
        async for page in source.window_pages(since or now - window.past, until or now + window.future):
            yield page


async def replan(
    planner: Planner,
    reports: Reports,
    name: str,
    pages: AsyncIterator[fhir.SearchPage] | Iterable[fhir.SearchPage],
    dry_run: bool,
    first_sight: bool = True,
) -> Replay:
    """Plan every appointment in `pages` as if seen for the first time (or, with first_sight=False, as the
    next poll would). Unless `dry_run`, new notifications and quarantined versions are recorded."""
    result = Replay()
    keys: set[str] = set()
    async for page in _aiter(pages):
        source = planner.config.sources[name]
        examined = examine(page, None, source.base_url, lean=source.validation == "lean")
        decision = await planner.decide(name, examined, first_sight)
        quarantined = [s for s in recorded(examined, decision) if s.problem]
        planned = []
        for notification in decision.notifications:  # several versions may plan one key
            if notification.key not in keys:
                keys.add(notification.key)
                planned.append(notification)
        existing = await reports.existing([p.key for p in planned])
        inserted: set[str] = set()
        if not dry_run:
            inserted = set(await planner.intake.record_page(name, planned, quarantined, None, {}, decision.withdrawals))
            planner.remember(name, page)
        result.items += [ReplayItem(p, existing.get(p.key), p.key in inserted) for p in planned]
        result.notes += decision.notes
        result.quarantined += [(name, q) for q in quarantined]
    return result


async def _aiter(pages: AsyncIterator[Any] | Iterable[Any]) -> AsyncIterator[Any]:
    if hasattr(pages, "__aiter__"):
        async for page in pages:
            yield page
    else:
        for page in pages:
            yield page
