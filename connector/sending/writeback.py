"""EHR write-back: the Communications owed for notifications (connector.ledger.writeback), written through
the source's own client (connector.sources.fhir_write) with a conditional create; and the hand-offs to
staff (connector.sending.handoff: a Task, or a signed webhook) for notifications that could not reach.

Runs after each dispatch and never touches an email: a write that fails is tried again with a backoff
(`write_back.retry_backoff`, doubling up to `retry_backoff_max`); one the EHR refuses is kept as `refused`
for a person (`connector status` lists it). A server whose CapabilityStatement does not say it creates
Communications conditionally is refused up front: without that, a retry could put a second one in the chart.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import httpx
import structlog

from connector import metrics
from connector.config.sources import WriteBackConfig
from connector.errors import SourceError
from connector.logs import where
from connector.sending.handoff import HandOff
from connector.sources.fhir_write import FhirWriter, WriteRefused
from connector.writeback import Fact, backoff, communication, if_none_exist

if TYPE_CHECKING:
    from connector.config import Config
    from connector.ledger import NotificationRecord
    from connector.ledger.abc import WriteBacks
    from connector.ledger.writeback import WriteBackJob
    from connector.mapping.loader import MappingSet
    from connector.models import Clock, Email
    from connector.sources.fhir_poll import FhirPollSource

log = structlog.get_logger("connector.writeback")
LEASE = timedelta(minutes=2)
BATCH = 50
KEPT = 10_000  # emails whose subject (and text) are kept in memory until written back, at most


class WriteBack:
    def __init__(
        self,
        config: Config,
        mappings: MappingSet,
        store: WriteBacks,
        sources: dict[str, FhirPollSource],
        clock: Clock,
        owner: str,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.mappings = mappings
        self.store = store
        self.clock = clock
        self.owner = owner
        self.writers = {name: FhirWriter(source) for name, source in sources.items()}
        self.kinds: dict[str, list[str]] = {
            "communication": [n for n, s in config.sources.items() if s.write_back.communication],
            "not-done": [n for n, s in config.sources.items() if s.write_back.communication and s.write_back.not_done],
        }
        # Hand-offs: the config's `handoff:` and the mappings' own (which a reload may turn on or off).
        self.handoff = HandOff(config, config.handoff, mappings, transport)
        self._handoff_sources = [*config.sources, *(config.crm if self.handoff.to == "webhook" else {})]
        self.horizon = max((s.write_back.horizon for s in config.sources.values()), default=timedelta(days=2))
        self.stopping = False
        # Subject and text of emails sent by this process, by key, until written back: memory only, never the
        # ledger (PHI). After a restart (or on another replica) the Communication names the mapping instead.
        self.sent: OrderedDict[str, tuple[str, str | None]] = OrderedDict()

    def remember(self, n: NotificationRecord, email: Email) -> None:
        """The dispatcher's `accepted` hook: keep what the Communication of this email will say."""
        source = self.config.sources.get(n.source)
        if source is None or not source.write_back.communication:
            return
        self.sent[n.key] = (email.subject, email.text if source.write_back.content == "full" else None)
        while len(self.sent) > KEPT:
            self.sent.popitem(last=False)

    @property
    def owed(self) -> dict[str, list[str]]:
        """Per kind of write, the sources that want it now."""
        return {**self.kinds, "handoff": self._handoff_sources if self.handoff.active else []}

    @property
    def enabled(self) -> bool:
        return any(self.owed.values())

    async def run(self) -> dict[str, int]:
        """Enqueue what is owed, then write what is due; returns counts by outcome (written, found, retry,
        refused)."""
        counts = {"written": 0, "found": 0, "none": 0, "retry": 0, "refused": 0}
        if not self.enabled:
            return counts
        wall = datetime.now(UTC)
        await self.store.enqueue(self.owed, wall - self.horizon)
        wall = datetime.now(UTC)
        while not self.stopping:
            # Due by the start of this run: a write retried in it waits for the next run.
            claimed = datetime.now(UTC)
            jobs = await self.store.claim(wall, BATCH, self.owner, claimed + LEASE)
            if not jobs:
                break
            for index, job in enumerate(jobs):
                if index and datetime.now(UTC) - claimed > LEASE / 2:
                    # A slow EHR: the rest of the batch is given back before its lease runs out, so that no
                    # other replica takes it while this one is still writing it; it is claimed again anew.
                    await self.store.release(self.owner)
                    break
                outcome = await self._write(job)
                counts[outcome] += 1
                metrics.inc("connector_write_backs_total", outcome=outcome)
        if any(counts.values()):
            log.info("writeback.done", **{k: v for k, v in counts.items() if v})
        return counts

    async def _write(self, job: WriteBackJob) -> str:
        try:
            if job.kind == "handoff":
                outcome, written_id = await self.handoff.write(job, self.writers.get(job.source))
            else:
                outcome, written_id = await self._communication(job)
        except WriteRefused as exc:
            await self.store.refuse(job.id, self.owner, str(exc))
            log.error("writeback.refused", notification=job.notification_id, source=job.source, problem=str(exc))
            return "refused"
        except SourceError as exc:
            await self.store.retry(job.id, self.owner, str(exc), self._later(job))
            log.warning("writeback.retry", notification=job.notification_id, source=job.source, problem=str(exc))
            return "retry"
        except Exception as exc:  # noqa: BLE001 - a bug here must not stop other writes, nor any email
            problem = f"unexpected {where(exc)}"
            await self.store.retry(job.id, self.owner, problem, self._later(job))
            log.error("writeback.crashed", notification=job.notification_id, problem=problem)
            return "retry"
        await self.store.done(job.id, self.owner, written_id)
        return outcome

    async def _communication(self, job: WriteBackJob) -> tuple[str, str]:
        settings = self.config.sources[job.source].write_back
        writer = self.writers.get(job.source)
        if writer is None:
            raise SourceError(f"source {job.source!r} is not configured")
        mapping = self.mappings.get(job.mapping)
        spec = mapping.spec if mapping is not None else None
        fact = Fact(job.kind, job.key, job.resource_id, job.patient_id, job.sent_at, job.reason)
        subject, text = self.sent.get(job.key, (None, None)) if job.kind == "communication" else (None, None)
        lost = settings.content == "full" and job.kind == "communication" and text is None
        resource = communication(
            fact,
            system=settings.identifier_system,
            reminder=spec is not None and spec.is_reminder,
            topic=subject or (spec.description if spec is not None and spec.description else job.mapping),
            text=text,
            note="message text not available: written after a restart, or by another replica" if lost else None,
        )
        what = f"write-back of a Communication for notification {job.notification_id}"
        capabilities = await writer.capabilities()
        if "Communication" not in capabilities.conditional_create:
            raise WriteRefused(
                f"source {job.source!r}: its CapabilityStatement does not offer conditional create of "
                "Communication, so a retry could write a second one; write-back needs it",
                0,
            )
        condition = if_none_exist(settings.identifier_system, job.kind, job.key)
        written = await writer.create(resource, if_none_exist=condition, what=what)
        self.sent.pop(job.key, None)
        return ("written" if written.created else "found"), f"{written.resource_type}/{written.id}"

    def _later(self, job: WriteBackJob) -> datetime:
        source = self.config.sources.get(job.source)
        settings = source.write_back if source is not None else WriteBackConfig()
        return datetime.now(UTC) + backoff(job.attempts + 1, settings.retry_backoff, settings.retry_backoff_max)

    async def release(self) -> None:
        if self.enabled:
            await self.store.release(self.owner)
        await self.handoff.aclose()
