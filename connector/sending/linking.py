"""The signed links an email carries, and what its unsubscribe link will need: shared by every preparer
(appointment, CRM event, CRM appointment), so that each email with links is treated the same way."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from connector import optout
from connector.links import EmailLinks, LinkKeys, for_email

if TYPE_CHECKING:
    from connector.config import Config
    from connector.ledger import NotificationRecord
    from connector.ledger.abc import PatientLinks
    from connector.models import Email


class EmailLinker:
    """`links` makes an email's links (None without `links:` and `server.public_url`); `stamp` records the
    keyed opt-out digest of the address the email goes to, then adds the one-click headers."""

    def __init__(self, config: Config, patient_links: PatientLinks | None) -> None:
        self._settings = config.links
        self._public_url = config.server.public_url if config.server is not None else None
        self._keys = LinkKeys.from_config(config.links) if config.links is not None else None
        self._optout_keys = optout.OptOutKeys.from_config(config.optout)
        self._patient_links = patient_links

    def links(
        self,
        n: NotificationRecord,
        *,
        language: str,
        zone: str,
        now: datetime,
        actions: Sequence[str] = (),
        start: datetime | None = None,
    ) -> EmailLinks | None:
        if self._keys is None or self._settings is None or self._public_url is None:
            return None
        return for_email(
            self._keys,
            self._public_url,
            notification=n.id,
            actions=list(actions),
            start=start,
            now=now,
            ttl=self._settings.ttl,
            language=language,
            zone=zone,
            mailto=self._settings.mailto,
        )

    async def stamp(self, n: NotificationRecord, email: Email, email_links: EmailLinks | None, now: datetime) -> Email:
        """Before the email goes: the keyed opt-out digest of its address, for its unsubscribe link (which then
        needs neither the EHR nor the patient's current address), and the one-click headers. A failure here
        fails the preparation, so no email with a link leaves unrecorded."""
        if email_links is None:
            return email
        if self._patient_links is not None and self._optout_keys is not None:
            keys = self._optout_keys
            stored = keys.keyed(optout.digest("email", email.to))
            await self._patient_links.remember(n.id, "email", stored, keys.current, now)
        return dataclasses.replace(email, headers={**email.headers, **email_links.headers})
