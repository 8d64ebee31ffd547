"""The preparer of CRM notifications: at send time the event is opened again (nothing but the sealed inbox
row holds its content), the object read from the CRM's API when the mapping asks for it (`fetch_object`),
the address read with the mapping's `recipient.path`, checked against the opt-outs (of the mapping's
category too), and the email rendered. With `links:` in the config the email carries an unsubscribe link
(`unsubscribe_url`) and the one-click headers, and the keyed opt-out digest of its address is recorded for
that link first (connector.ledger.patient_links)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import httpx

from connector import optout
from connector.addresses import usable
from connector.crm.inbox import Keyring, SealError, open_event
from connector.errors import ResourceError, SourceError
from connector.mapping.engine import CrmRenderRequest, RenderError, render_crm
from connector.models import State
from connector.sending.linking import EmailLinker
from connector.sending.preparer import NotSendable, NotYet, Prepared
from connector.sending.recipients import optout_lookup
from connector.sources.hubspot import HubSpotClient

if TYPE_CHECKING:
    from connector.config import Config
    from connector.ledger import NotificationRecord
    from connector.ledger.abc import Inbox, OptOuts, PatientLinks
    from connector.mapping.loader import Mapping


class CrmPreparer:
    def __init__(
        self,
        config: Config,
        inbox: Inbox,
        optouts: OptOuts,
        keyring: Keyring,
        transport: httpx.AsyncBaseTransport | None = None,
        patient_links: PatientLinks | None = None,
    ) -> None:
        self.config = config
        self.inbox = inbox
        self.optouts = optouts
        self.keyring = keyring
        self._opted_out = optout_lookup(optouts)
        self.linker = EmailLinker(config, patient_links)
        self.apis = {
            name: HubSpotClient(name, settings, transport)
            for name, settings in config.crm.items()
            if settings.kind == "hubspot" and settings.api_token is not None
        }

    async def read_ahead(self, batch: list[NotificationRecord]) -> None:
        return None  # each event is opened when its notification is prepared

    async def prepare(self, n: NotificationRecord, mapping: Mapping, now: datetime) -> Prepared:
        """The email for a due CRM notification, or why it cannot be sent (now, or at all)."""
        row = await self.inbox.get(int(n.resource_id))
        if row is None:
            return NotSendable(State.SKIPPED, "the CRM event is no longer in the inbox (past its retention)")
        try:
            event = open_event(self.keyring, row)
        except (ResourceError, SealError) as exc:
            return NotSendable(State.FAILED, str(exc))
        if mapping.spec.fetch_object:
            api = self.apis.get(row.source)
            if api is None or not event.get("object_id"):
                return NotSendable(
                    State.FAILED, "fetch_object needs a hubspot source with api_token and an event with an object id"
                )
            try:
                event["object"] = await api.read(str(event.get("event_type")), str(event["object_id"]))
            except SourceError as exc:
                return NotYet(str(exc))
            if event["object"] is None:
                return NotSendable(State.SKIPPED, "the CRM object no longer exists")
        assert mapping.recipient is not None
        try:
            found = mapping.recipient(event)
        except Exception as exc:  # noqa: BLE001 - fhirpathpy raises bare Exception
            return NotSendable(State.FAILED, f"recipient path failed ({type(exc).__name__})")
        address = next((v for v in found if usable(v)), None)  # as it is: never trimmed or split
        if address is None:
            return NotSendable(
                State.SKIPPED, f"the {row.event_type} event has no usable email address at the recipient path"
            )
        match = await self._opted_out(optout.candidates([], address), mapping.spec.category, mapping.spec.essential)
        if match is not None:
            which = f" of {match.category!r} email" if match.category else ""
            return NotSendable(
                State.SKIPPED, f"the address opted out{which} ({match.origin}, {match.created_at.date().isoformat()})"
            )
        zone = self.config.crm[row.source].timezone if row.source in self.config.crm else "UTC"
        email_links = self.linker.links(n, language=mapping.variant_for([])[0], zone=zone, now=now)
        request = CrmRenderRequest(
            key=n.key,
            to=address,
            event=event,
            source=row.source,
            timezone=zone,
            locale=self.config.locale,
            now=now,
            default_from=self.config.delivery.from_address,
            default_reply_to=self.config.delivery.reply_to,
            links=email_links.values if email_links else {},
        )
        try:
            email = render_crm(mapping, request)
        except RenderError as exc:
            return NotSendable(State.FAILED, str(exc))
        return await self.linker.stamp(n, email, email_links, now)

    async def aclose(self) -> None:
        for api in self.apis.values():
            await api.aclose()
