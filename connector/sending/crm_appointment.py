"""The preparer of CRM appointment notifications (`resource: CrmAppointment`): at send time the appointment's
remembered state names the inbox event that last described it; that event is opened again (with its CRM
object read anew when the source asks for it), checked to still want this notification (the same rule as
for FHIR: connector.lifecycle.still_wanted), and the address, language and name read with the source's
declaration (a mapping's own `recipient.path` wins), checked against the opt-outs and the addresses suppressed
after bounces (connector.bounces: the same per-contact rule as for FHIR patients), and the email rendered."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from connector import optout
from connector.crm.appointments import AppointmentEmail, contact_of, describe, object_gone, render_appointment
from connector.crm.inbox import Keyring, SealError, open_event
from connector.errors import ResourceError, SourceError
from connector.lifecycle import still_wanted
from connector.mapping.engine import RenderError
from connector.mapping.spec import RecipientPath
from connector.models import State
from connector.sending.linking import EmailLinker
from connector.sending.preparer import NoSource, NotSendable, NotYet, Prepared
from connector.sending.recipients import bounce_lookup, optout_lookup

if TYPE_CHECKING:
    from connector.bounces import Tally
    from connector.config import Config
    from connector.ledger import NotificationRecord
    from connector.ledger.abc import Bounces, Inbox, Intake, OptOuts, PatientLinks
    from connector.mapping.loader import Mapping
    from connector.optout import OptOutKeys
    from connector.sources.hubspot import HubSpotClient


class CrmAppointmentPreparer:
    def __init__(
        self,
        config: Config,
        intake: Intake,
        inbox: Inbox,
        optouts: OptOuts,
        keyring: Keyring,
        apis: dict[str, HubSpotClient],
        bounces: Bounces | None = None,
        keys: OptOutKeys | None = None,
        patient_links: PatientLinks | None = None,
    ) -> None:
        self.config = config
        self._opted_out = optout_lookup(optouts)
        self.linker = EmailLinker(config, patient_links)
        self.bounces = bounce_lookup(bounces, keys) if bounces is not None and config.bounces.suppress else None
        self.keys = keys
        self.intake = intake
        self.inbox = inbox
        self.optouts = optouts
        self.keyring = keyring
        self.apis = apis  # shared with the CRM event preparer, which closes them

    async def read_ahead(self, batch: list[NotificationRecord]) -> None:
        return None  # each appointment's event is opened when its notification is prepared

    async def prepare(self, n: NotificationRecord, mapping: Mapping, now: datetime) -> Prepared:
        crm = self.config.crm.get(n.source)
        if crm is None or crm.appointment is None:
            return NoSource(n.source)
        settings = crm.appointment
        state = await self.intake.snapshot(n.source, n.resource_id)
        if state is None or not state.version.isdigit():
            return NotSendable(State.SKIPPED, "the CRM appointment is no longer remembered")
        row = await self.inbox.get(int(state.version))
        if row is None:
            return NotSendable(State.SKIPPED, "the CRM event that described the appointment is no longer in the inbox")
        try:
            event = open_event(self.keyring, row)
        except (ResourceError, SealError) as exc:
            return NotSendable(State.FAILED, str(exc))
        api = self.apis.get(n.source)
        if settings.fetch_object and api is not None:
            try:
                event["object"] = await api.read(
                    str(event.get("event_type")), str(event.get("object_id")), settings.object_type
                )
            except SourceError as exc:
                return NotYet(str(exc))
            if object_gone(settings, event):
                return NotSendable(State.CANCELLED, "the CRM object no longer exists")
        try:
            described = describe(settings, event, state.version, crm.timezone)
            path = mapping.spec.recipient.path if isinstance(mapping.spec.recipient, RecipientPath) else None
            contact = contact_of(settings, described.view if path else event, path)
        except ResourceError as exc:
            return NotSendable(State.FAILED, str(exc))
        stale = still_wanted(n.event, mapping.spec.is_reminder, n.appointment_start, described.view, now)
        if stale is not None:
            return NotSendable(State.CANCELLED, stale)
        if contact.address is None:
            return NotSendable(State.SKIPPED, "the CRM appointment's event has no usable email address")
        match = await self._opted_out(
            optout.candidates([], contact.address), mapping.spec.category, mapping.spec.essential
        )
        if match is not None:
            which = f" of {match.category!r} email" if match.category else ""
            return NotSendable(State.SKIPPED, f"the address opted out{which} ({match.created_at.date().isoformat()})")
        if self.bounces is not None and n.patient_id:  # an address that bounced for this contact: not again
            bounced = await self.bounces(n.source, n.patient_id, contact.address)
            if bounced is not None:
                return NotSendable(State.SKIPPED, _bounced(bounced))
        email_links = self.linker.links(
            n, language=mapping.variant_for(list(contact.languages))[0], zone=described.zone, now=now
        )
        request = AppointmentEmail(
            key=n.key,
            event=n.event,
            source=n.source,
            described=described,
            contact=contact,
            to=contact.address,
            locale=self.config.locale,
            now=now,
            default_from=self.config.delivery.from_address,
            default_reply_to=self.config.delivery.reply_to,
            links=email_links.values if email_links else {},
        )
        try:
            email = render_appointment(mapping, request)
        except RenderError as exc:
            return NotSendable(State.FAILED, str(exc))
        return await self.linker.stamp(n, email, email_links, now)


def _bounced(tally: Tally) -> str:
    """The skip reason (the hand-off reads `bounced`); no id of the contact, which may be an address."""
    when = tally.suppressed_at.date().isoformat() if tally.suppressed_at else "?"
    return (
        f"the CRM appointment's address bounced ({tally.reason}, {when}); it stays suppressed until the event "
        "gives another address or an operator clears it"
    )
