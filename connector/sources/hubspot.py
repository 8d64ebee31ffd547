"""HubSpot CRM API reads: the object a webhook event is about, for mappings with `fetch_object: true`.

HubSpot webhook events carry ids and the changed property only; the address and names are on the object
(`GET {api_base}/crm/v3/objects/{type}/{id}?properties=...`, private app token). Errors name the object
type, id and HTTP status, never the answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from connector.errors import SourceError

if TYPE_CHECKING:
    from connector.config.sources import CrmSourceConfig

# subscriptionType prefix → CRM object type in the v3 API
OBJECT_TYPES = {"contact": "contacts", "company": "companies", "deal": "deals", "ticket": "tickets"}


def object_type(event_type: str) -> str | None:
    return OBJECT_TYPES.get(event_type.split(".", 1)[0])


class HubSpotClient:
    def __init__(self, name: str, settings: CrmSourceConfig, transport: httpx.AsyncBaseTransport | None = None):
        assert settings.api_token is not None
        self.name = name
        self.properties = settings.properties
        self._client = httpx.AsyncClient(
            base_url=settings.api_base.rstrip("/") + "/",
            timeout=10.0,
            transport=transport,
            headers={"Authorization": f"Bearer {settings.api_token.get_secret_value()}", "Accept": "application/json"},
        )

    async def read(self, event_type: str, object_id: str, kind: str | None = None) -> dict[str, Any] | None:
        """The object (`{"id", "properties": {...}}`), None when HubSpot no longer has it. Raises
        SourceError when HubSpot cannot be read now (the notification waits for the next pass). `kind`
        names the object type (e.g. meetings) when the event type does not."""
        kind = kind or object_type(event_type)
        if kind is None:
            raise SourceError(f"crm source {self.name!r}: no CRM object type for {event_type!r} events")
        what = f"HubSpot {kind}/{object_id}"
        try:
            response = await self._client.get(
                f"crm/v3/objects/{kind}/{object_id}", params={"properties": ",".join(self.properties)}
            )
        except httpx.HTTPError as exc:
            raise SourceError(f"crm source {self.name!r}: read of {what} failed: {type(exc).__name__}") from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise SourceError(f"crm source {self.name!r}: read of {what} answered HTTP {response.status_code}")
        try:
            found = response.json()
        except ValueError:
            raise SourceError(f"crm source {self.name!r}: read of {what} is not JSON") from None
        return found if isinstance(found, dict) else None

    async def aclose(self) -> None:
        await self._client.aclose()
