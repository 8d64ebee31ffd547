"""The preparer of appointment notifications: read the Appointment (from the poller's cache when it holds
the planned version, else from the source), check it is still wanted, find the recipient (the surviving
Patient record, its address, the opt-out and Consent rules: connector.sending.recipients), render.

An appointment the source no longer has is `Gone`, unless the notification is the cancellation itself: that
one is rendered from the remembered state (connector.lifecycle.synthesized), as no PHI was kept.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import TYPE_CHECKING

from connector import calendar, fhir
from connector.bounces import skip_reason
from connector.errors import SourceError
from connector.lifecycle import CANCELLED, NOSHOW, appointment_zone, still_wanted, synthesized
from connector.mapping.engine import RenderError, RenderRequest, render
from connector.models import State
from connector.sending.linking import EmailLinker
from connector.sending.preparer import Gone, NoSource, NotSendable, NotYet, Prepared
from connector.sending.recipients import (
    NoRecipient,
    bounce_lookup,
    optout_lookup,
    prefetch,
    read_cached,
    resolve,
)

if TYPE_CHECKING:
    from connector.config import Config
    from connector.ledger import NotificationRecord
    from connector.ledger.abc import Bounces, Intake, OptOuts, PatientLinks
    from connector.mapping.loader import Mapping
    from connector.optout import OptOutKeys
    from connector.sources.cache import ResourceCache
    from connector.sources.fhir_poll import FhirPollSource


class AppointmentPreparer:
    def __init__(
        self,
        config: Config,
        sources: dict[str, FhirPollSource],
        cache: ResourceCache,
        intake: Intake,
        optouts: OptOuts,
        bounces: Bounces | None = None,
        keys: OptOutKeys | None = None,
        patient_links: PatientLinks | None = None,
    ) -> None:
        self.config = config
        self.bounces = bounce_lookup(bounces, keys) if bounces is not None and config.bounces.suppress else None
        self.keys = keys
        self.sources = sources
        self.cache = cache
        self.intake = intake
        self._opted_out = optout_lookup(optouts)
        self.linker = EmailLinker(config, patient_links)

    async def read_ahead(self, batch: list[NotificationRecord]) -> None:
        await prefetch(self.cache, self.sources, batch)

    async def prepare(self, n: NotificationRecord, mapping: Mapping, now: datetime) -> Prepared:
        source = self.sources.get(n.source)
        if source is None:
            return NoSource(n.source)
        if not fhir.FHIR_ID.fullmatch(n.resource_id) or (n.patient_id and not fhir.FHIR_ID.fullmatch(n.patient_id)):
            return NotSendable(
                State.FAILED,
                "the notification names its Appointment or Patient by an id "
                "that is not a FHIR id (planned by an earlier version)",
            )
        try:
            appointment = await read_cached(self.cache, source, "Appointment", n.resource_id, n.resource_version)
            if appointment is None and n.event in (CANCELLED, NOSHOW):
                before = await self.intake.snapshot(n.source, n.resource_id)
                appointment = synthesized(n.resource_id, before) if before is not None else None
            if appointment is None:
                return Gone(n.source, n.resource_id)
            stale = still_wanted(n.event, mapping.spec.is_reminder, n.appointment_start, appointment, now)
            if stale is not None:
                return NotSendable(State.CANCELLED, stale)
            recipient = await resolve(
                n.patient_id,
                source=source,
                cache=self.cache,
                opted_out=self._opted_out,
                consent=source.config.consent,
                now=now,
                category=mapping.spec.category,
                essential=mapping.spec.essential,
                lean=source.config.validation == "lean",
            )
        except SourceError as exc:
            return NotYet(str(exc))
        if isinstance(recipient, NoRecipient):
            return NotSendable(recipient.state, recipient.reason)
        if self.bounces is not None:  # an address that bounced for this patient is not tried again
            bounced = await self.bounces(n.source, n.patient_id, recipient.address)
            if bounced is not None:
                return NotSendable(State.SKIPPED, skip_reason(n.patient_id, bounced))
        settings = source.config
        zone = appointment_zone(appointment, settings.location_timezones, settings.timezone)
        languages = tuple(fhir.preferred_languages(recipient.patient))
        email_links = self.linker.links(
            n,
            language=mapping.variant_for(list(languages))[0],
            zone=zone,
            now=now,
            actions=mapping.spec.actions,
            start=fhir.parse_instant(appointment.get("start")),
        )
        request = RenderRequest(
            key=n.key,
            to=recipient.address,
            appointment=appointment,
            patient=recipient.patient,
            event=n.event,
            source=n.source,
            timezone=zone,
            locale=self.config.locale,
            now=now,
            default_from=self.config.delivery.from_address,
            default_reply_to=self.config.delivery.reply_to,
            languages=languages,
            links=email_links.values if email_links else {},
        )
        try:
            email = render(mapping, request)
        except RenderError as exc:
            return NotSendable(State.FAILED, str(exc))
        email = await self.linker.stamp(n, email, email_links, now)
        if mapping.spec.attach_ics:
            ics = calendar.invitation(
                appointment,
                source=n.source,
                cancelled=n.event == CANCELLED,
                summary=email.subject,
                organizer=email.from_address,
                zone=zone,
                now=now,
                attendee=email.to,
            )
            email = dataclasses.replace(email, attachments=(*email.attachments, *([ics] if ics else [])))
        return email
