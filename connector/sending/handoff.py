"""The hand-off to staff, as write-back does it (connector.sending.writeback runs it for rows of kind
`handoff`): a FHIR Task on the appointment's source — created conditionally on an identifier derived from
(source, appointment, patient), so there is one per appointment and patient; a later reason is added to
that Task as a note by a version-aware update — or a signed JSON event POSTed to `handoff.url`.

`write` returns how the row ends: `written`, `found` (already there, with this reason), `none` (this
notification needs no hand-off), or raises SourceError (try again later) / WriteRefused (a person must look).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import httpx

from connector.config.handoff import handoff_to
from connector.crm.verify import standard_webhook_headers
from connector.errors import SourceError
from connector.handoff import Rules, active, event, note_of, rules_for, task, wanted, with_reason
from connector.sources.fhir_write import StaleVersion, WriteRefused
from connector.writeback import identifier_condition

if TYPE_CHECKING:
    from connector.config import Config
    from connector.config.handoff import HandoffConfig
    from connector.ledger.writeback import WriteBackJob
    from connector.mapping.loader import MappingSet
    from connector.sources.fhir_write import FhirWriter

UPDATE_TRIES = 3  # a Task changed by someone else between our read and our update: read it again
REPLY_BYTES = 64 * 1024  # at most this much of a webhook receiver's reply is read (and dropped)
DEADLINE = 30.0  # seconds for one webhook POST, reply included (the client's 10 s apply to each read)


class HandOff:
    """`settings`: the config's `handoff:` (None: only mappings with their own `handoff:` are handed off,
    as Tasks); each mapping's `handoff:` is read at the time of the write, so a reload counts."""

    def __init__(
        self,
        config: Config,
        settings: HandoffConfig | None,
        mappings: MappingSet,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.config = config
        self.settings = settings
        self.mappings = mappings
        self._http: httpx.AsyncClient | None = None
        self._transport = transport

    @property
    def to(self) -> str:
        return handoff_to(self.settings)

    @property
    def active(self) -> bool:
        """Whether anything may be handed off: a `handoff:` section, or a mapping that turns it on."""
        return active(self.settings, self.mappings)

    def rules(self, mapping: str) -> Rules | None:
        found = self.mappings.get(mapping)
        return rules_for(mapping, self.settings, found.spec.handoff if found is not None else None)

    def wanted(self, job: WriteBackJob) -> tuple[str, Rules] | None:
        """The hand-off reason of this notification and the rules of its mapping, if it is handed off."""
        rules = self.rules(job.mapping)
        found = self.mappings.get(job.mapping)
        reason = wanted(job.state, job.reason, rules, essential=found is not None and found.spec.essential)
        return None if reason is None or rules is None else (reason, rules)

    async def write(self, job: WriteBackJob, writer: FhirWriter | None) -> tuple[str, str]:
        """(outcome, what was written: `Task/<id>` or the event id)."""
        found = self.wanted(job)
        if found is None:
            return "none", ""
        reason, rules = found
        if self.to == "webhook":
            return await self._post(job, reason)
        if writer is None:
            raise WriteRefused(f"source {job.source!r} is not a FHIR source: a Task cannot be written there", 0)
        return await self._task(job, reason, rules, writer)

    async def _task(self, job: WriteBackJob, reason: str, rules: Rules, writer: FhirWriter) -> tuple[str, str]:
        system = self.config.sources[job.source].write_back.identifier_system
        resource = task(
            system=system,
            source=job.source,
            appointment_id=job.resource_id,
            patient_id=job.patient_id,
            reason=reason,
            mapping=job.mapping,
            detail=job.reason,
            owner=rules.owner,
            now=datetime.now(UTC),
        )
        capabilities = await writer.capabilities()
        if "Task" not in capabilities.conditional_create or "Task" not in capabilities.versioned_update:
            raise WriteRefused(
                f"source {job.source!r}: its CapabilityStatement does not offer conditional create and "
                "versioned update of Task, which a hand-off needs to stay one Task per appointment and patient",
                0,
            )
        what = f"hand-off Task for notification {job.notification_id}"
        condition = identifier_condition(system, resource["identifier"][0]["value"])
        written = await writer.create(resource, if_none_exist=condition, what=what)
        if written.created:
            return "written", f"Task/{written.id}"
        note = note_of(reason, job.mapping, job.reason)
        for _ in range(UPDATE_TRIES):
            current = await writer.read("Task", written.id)
            if current is None:
                raise SourceError(f"source {job.source!r}: {what}: Task/{written.id} disappeared")
            changed = with_reason(current.resource, note)
            if changed is None:
                return "found", f"Task/{written.id}"
            try:
                await writer.update(changed, version=current.version, what=what)
                return "written", f"Task/{written.id}"
            except StaleVersion:
                continue
        raise SourceError(f"source {job.source!r}: {what}: Task/{written.id} kept changing; tried again later")

    async def _post(self, job: WriteBackJob, reason: str) -> tuple[str, str]:
        assert self.settings is not None and self.settings.url is not None and self.settings.secret is not None
        body = json.dumps(
            event(
                key=job.key,
                source=job.source,
                resource=f"{job.resource_type}/{job.resource_id}",
                patient=(f"Patient/{job.patient_id}" if job.resource_type == "Appointment" else job.patient_id) or None,
                reason=reason,
                mapping=job.mapping,
                detail=job.reason,
                now=datetime.now(UTC),
            ),
            ensure_ascii=False,
        ).encode()
        # The same id on every try of one hand-off: the receiver drops repeats (Standard Webhooks `webhook-id`).
        msg_id = f"handoff_{uuid.uuid5(uuid.NAMESPACE_URL, f'connector:{job.key}').hex}"
        headers = standard_webhook_headers(
            self.settings.secret.get_secret_value(), msg_id, int(datetime.now(UTC).timestamp()), body
        )
        if self._http is None:
            self._http = httpx.AsyncClient(transport=self._transport, timeout=10.0, follow_redirects=False)
        try:
            async with asyncio.timeout(DEADLINE):
                status = await self._send(self._http, self.settings.url, body, headers)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise SourceError(f"hand-off webhook: {type(exc).__name__}") from exc
        if status in (408, 429) or status >= 500:
            raise SourceError(f"hand-off webhook answered HTTP {status}")
        if status >= 300:
            raise WriteRefused(f"hand-off webhook refused the event (HTTP {status})", status)
        return "written", msg_id

    @staticmethod
    async def _send(http: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]) -> int:
        """POST the event; the status code. Only the status counts: at most REPLY_BYTES of the receiver's
        reply are read (and dropped, never logged), so a receiver answering without end cannot fill memory."""
        request = http.build_request("POST", url, content=body, headers={**headers, "Content-Type": "application/json"})
        reply = await http.send(request, stream=True)
        try:
            taken = 0
            async for chunk in reply.aiter_raw():
                taken += len(chunk)
                if taken >= REPLY_BYTES:
                    break
        finally:
            await reply.aclose()
        return reply.status_code

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
