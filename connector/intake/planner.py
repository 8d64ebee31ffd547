"""The planner: every way in (a poll's pages, pushed resources, a deletion) goes examine → decide → commit.

examine  validate the versions and drop those already seen (connector.intake.checks)
decide   diff each version against its remembered state and plan the transitions (connector.intake.decide)
commit   one transaction: withdrawn and new notifications, the new states, the seen versions and (for a
         poll) the cursor, moved last

One resource version that cannot be processed is quarantined alone: examined, decided and checked one
version at a time, and, should the ledger refuse a page for its data, recorded one version at a time.
Only an outage (of the source or the ledger) stops the work.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from connector import fhir, metrics
from connector.errors import ResourceError
from connector.intake.checks import Examined, check_storable, examine, reason, seen_key, triples
from connector.intake.decide import Decision, Rules, decide, deleted_version, deletion, recorded, triple
from connector.ledger import SeenVersion
from connector.ledger.engine import unavailable
from connector.logs import safe_text, where
from connector.timing import QuietHours

if TYPE_CHECKING:
    from collections.abc import Callable

    from connector.config import Config
    from connector.ledger.abc import Intake
    from connector.mapping.loader import MappingSet
    from connector.models import Clock
    from connector.sources.cache import ResourceCache

log = structlog.get_logger("connector.pipeline")


@dataclass
class Committed:
    """What a commit recorded: the notification keys inserted and the versions quarantined."""

    inserted: list[str] = field(default_factory=list)
    quarantined: list[SeenVersion] = field(default_factory=list)

    def __iadd__(self, other: Committed) -> Committed:
        self.inserted += other.inserted
        self.quarantined += other.quarantined
        return self


class Planner:
    """Turns what a source says into committed notifications, one change at a time per source."""

    def __init__(
        self, config: Config, mappings: MappingSet, intake: Intake, cache: ResourceCache, clock: Clock
    ) -> None:
        self.config = config
        self.mappings = mappings
        self.intake = intake
        self.cache = cache
        self.clock = clock
        quiet = config.quiet_hours
        self.quiet = QuietHours(quiet.start, quiet.end) if quiet else None
        # One change at a time per source in this process: a poll, a pushed notification and a deletion
        # found at send time must not decide from the same remembered state at once.
        self._busy: dict[str, asyncio.Lock] = {name: asyncio.Lock() for name in config.sources}
        # Called after notifications were committed (the daemon wakes its dispatcher: see daemon.py).
        self.on_planned: Callable[[], None] | None = None

    def _planned(self, inserted: list[str]) -> None:
        if inserted and self.on_planned is not None:
            self.on_planned()

    def busy(self, name: str) -> asyncio.Lock:
        """The source's lock: held by a poll for its whole run, and by `ingest` and `deleted`."""
        return self._busy[name]

    def rules(self, name: str) -> Rules:
        return Rules(
            name,
            self.config.sources[name],
            self.mappings,
            self.quiet,
            self.clock,
            frozenset(self.config.reschedule_on),
        )

    def remember(self, source: str, page: fhir.SearchPage) -> None:
        """Keep what a page holds for the dispatcher (connector.sources.cache)."""
        for resource in [*page.matches, *page.included.values()]:
            if isinstance(resource, dict) and resource.get("id"):
                self.cache.put(source, resource)

    # -- examine → decide → commit -----------------------------------------------------------------------

    async def examine(self, name: str, page: fhir.SearchPage) -> Examined:
        """The page's versions not seen before, validated."""
        fresh = await self.intake.new_versions(name, triples(page))
        source = self.config.sources[name]
        return examine(page, fresh, source.base_url, lean=source.validation == "lean")

    async def decide(self, name: str, examined: Examined, first_sight: bool) -> Decision:
        """`decide` with the remembered states and who was told, read from the ledger (none at first sight)."""
        ids = [str(item.resource["id"]) for item in examined.valid]
        before = {} if first_sight else await self.intake.snapshots(name, ids)
        notified = await self.intake.notified(name, ids) if ids else set()
        decision = decide(self.rules(name), examined.valid, before, notified)
        self._failed(name, decision)
        return decision

    async def commit(self, name: str, examined: Examined, decision: Decision, cursor: datetime | None) -> Committed:
        """Record a page in one transaction. Should the ledger refuse it for its data (not an outage), each
        version is recorded on its own and the one refused is quarantined; the cursor moves last."""
        seen = recorded(examined, decision)
        try:
            inserted = await self.intake.record_page(
                name, decision.notifications, seen, cursor, decision.snapshots, decision.withdrawals
            )
        except Exception as exc:
            if unavailable(exc):
                raise
            log.error("page.refused", source=name, problem=where(exc), action="recording each version alone")
            return await self._commit_each(name, examined, seen, cursor)
        quarantined = [s for s in seen if s.problem]
        self._report(name, quarantined)
        self._planned(inserted)
        return Committed(inserted, quarantined)

    async def _commit_each(
        self, name: str, examined: Examined, seen: list[SeenVersion], cursor: datetime | None
    ) -> Committed:
        done = Committed()
        quarantined = {triple(s): s for s in seen if s.problem}
        for item in examined.valid:
            key = seen_key(item.resource)
            if key in quarantined:
                continue
            single = Examined(valid=[item], seen=[s for s in seen if triple(s) == key])
            try:
                decision = await self.decide(name, single, first_sight=False)
                rows = recorded(single, decision)
                done.inserted += await self.intake.record_page(
                    name, decision.notifications, rows, None, decision.snapshots, decision.withdrawals
                )
                quarantined.update({triple(r): r for r in rows if r.problem})
            except Exception as exc:
                if unavailable(exc):
                    raise
                quarantined[key] = SeenVersion(*key, item.last_updated, reason(exc, "recording"))
        done.quarantined = list(quarantined.values())
        await self.intake.record_page(name, [], done.quarantined, cursor)
        self._report(name, done.quarantined)
        return done

    def _failed(self, name: str, decision: Decision) -> None:
        for resource, note in decision.failed:
            log.error("mapping.failed", mapping=note.mapping, source=name, resource=resource, problem=note.message)

    def _report(self, name: str, quarantined: list[SeenVersion]) -> None:
        """Each quarantined version is logged and counted once: when it is recorded (a version already
        recorded is not read again, see Intake.new_versions)."""
        for row in quarantined:
            log.error(
                "resource.quarantined",
                source=name,
                resource=f"{row.resource_type}/{row.resource_id}",
                version=row.version,
                problem=row.problem,
            )
            metrics.inc("connector_quarantined_total", source=name)

    # -- other ways in -----------------------------------------------------------------------------------

    async def ingest(self, name: str, resources: list[Any]) -> Committed:
        """Appointments that arrived otherwise than by a poll (a subscription, a re-read): diffed, planned
        and committed like a page; versions already seen are skipped. Returns the keys inserted and the
        versions quarantined."""
        async with self.busy(name):
            return await self.ingest_locked(name, resources)

    async def ingest_locked(self, name: str, resources: list[Any]) -> Committed:
        """`ingest`, for a caller that holds `busy(name)` (a poll)."""
        page = fhir.SearchPage(matches=list(resources))
        examined = await self.examine(name, page)
        decision = await self.decide(name, examined, first_sight=False)
        committed = await self.commit(name, examined, decision, None)
        self.remember(name, page)
        return committed

    async def deleted(self, name: str, appointment_id: str) -> Committed:
        """The source says this appointment is gone: withdraw what is pending and plan what a deletion
        means (a cancellation, if the patient was told about the appointment)."""
        async with self.busy(name):
            return await self.deleted_locked(name, appointment_id)

    async def deleted_locked(self, name: str, appointment_id: str) -> Committed:
        """`deleted`, for a caller that holds `busy(name)` (a poll)."""
        version = "deleted"
        try:
            if not fhir.FHIR_ID.fullmatch(appointment_id):
                raise ResourceError("a deletion names an Appointment by an id that is not a FHIR id")
            before = (await self.intake.snapshots(name, [appointment_id])).get(appointment_id)
            if before is None:  # never seen, or its deletion was handled already
                return Committed()
            version = deleted_version(before)
            notified = await self.intake.notified(name, [appointment_id])
            decision = deletion(self.rules(name), appointment_id, before, notified)
            self._failed(name, decision)
            check_storable(decision.notifications)
            inserted = await self.intake.record_page(
                name, decision.notifications, [], None, decision.snapshots, decision.withdrawals
            )
        except Exception as exc:
            if unavailable(exc):
                raise
            row = SeenVersion("Appointment", safe_text(appointment_id, 128), version, None, reason(exc, "deletion"))
            first = await self.intake.new_versions(name, [triple(row)])
            await self.intake.record_page(name, [], [row], None)
            self._report(name, [row] if first else [])
            return Committed(quarantined=[row])
        log.info(
            "appointment.deleted",
            source=name,
            resource=f"Appointment/{appointment_id}",
            notifications=len(decision.notifications),
        )
        self._planned(inserted)
        return Committed(inserted)
