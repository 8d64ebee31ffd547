"""FHIR R4 polling source: `Appointment?_lastUpdated=ge…&_include=Appointment:patient`, page by page.

Only I/O lives here (HTTP, auth, paging, JSON). What a page means is decided in connector.pipeline.
Errors are SourceError with the source name, the request kind and the HTTP status: never a body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from connector.config import BasicAuth, BearerAuth, FhirPollSourceConfig, SmartAuth
from connector.errors import ResourceError, SourceError
from connector.fhir import SearchPage, split_search_bundle
from connector.sources.smart import SmartBackendAuth

Params = list[tuple[str, Any]]


def fhir_instant(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FhirPollSource:
    """One configured FHIR server. `transport` lets tests put any httpx transport underneath."""

    def __init__(self, name: str, config: FhirPollSourceConfig,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.name = name
        self.config = config
        headers = {"Accept": "application/fhir+json"}
        auth: httpx.Auth | None = None
        self._smart: SmartBackendAuth | None = None
        if isinstance(config.auth, BearerAuth):
            headers["Authorization"] = f"Bearer {config.auth.token.get_secret_value()}"
        elif isinstance(config.auth, BasicAuth):
            auth = httpx.BasicAuth(config.auth.username, config.auth.password.get_secret_value())
        elif isinstance(config.auth, SmartAuth):
            self._smart = auth = SmartBackendAuth(
                fhir_base_url=config.base_url, client_id=config.auth.client_id,
                private_key_pem=config.auth.private_key.get_secret_value().encode(), key_id=config.auth.key_id,
                algorithm=config.auth.algorithm, scope=config.auth.scope,
                token_endpoint=config.auth.token_endpoint, transport=transport, timeout=config.timeout.total_seconds())
        self._origin = urlsplit(config.base_url).netloc
        self._client = httpx.AsyncClient(base_url=config.base_url + "/", headers=headers, auth=auth,
                                         timeout=config.timeout.total_seconds(), transport=transport)

    def search_params(self, since: datetime | None, until: datetime | None = None) -> Params:
        params: Params = []
        if since is not None:
            params.append(("_lastUpdated", f"ge{fhir_instant(since)}"))
        if until is not None:
            params.append(("_lastUpdated", f"le{fhir_instant(until)}"))
        params += [("_sort", "_lastUpdated"), ("_include", "Appointment:patient"),
                   ("_count", str(self.config.page_size))]
        return params

    async def pages(self, since: datetime | None, until: datetime | None = None) -> AsyncIterator[SearchPage]:
        """Appointments changed since `since` (and up to `until`), following `next` links verbatim."""
        url: str | None = "Appointment"
        params: Params | None = self.search_params(since, until)
        number = 0
        while url:
            number += 1
            bundle = await self._get_json(url, params, f"Appointment search page {number}")
            try:
                page = split_search_bundle(bundle, "Appointment")
            except ResourceError as exc:
                raise SourceError(f"source {self.name!r}: Appointment search page {number}: {exc}") from None
            yield page
            url, params = page.next_url, None
            if url and urlsplit(url).netloc not in ("", self._origin):
                raise SourceError(f"source {self.name!r}: page {number} links to another host "
                                  f"({urlsplit(url).netloc}); refusing to send credentials there")

    async def search(self, resource_type: str, params: Params, limit_pages: int = 5) -> list[dict[str, Any]]:
        """Every match of a small search (a patient's Consents, say), following at most a few pages."""
        found: list[dict[str, Any]] = []
        url: str | None = resource_type
        query: Params | None = params
        for number in range(1, limit_pages + 1):
            if url is None:
                break
            bundle = await self._get_json(url, query, f"{resource_type} search page {number}")
            try:
                page = split_search_bundle(bundle, resource_type)
            except ResourceError as exc:
                raise SourceError(f"source {self.name!r}: {resource_type} search: {exc}") from None
            found += [m for m in page.matches if isinstance(m, dict)]
            url, query = page.next_url, None
        return found

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The current version of a resource, or None when the server says it is gone (404/410)."""
        what = f"read of {resource_type}/{resource_id}"
        resource = await self._get_json(f"{resource_type}/{resource_id}", None, what, missing_ok=True)
        if resource is not None and not isinstance(resource, dict):
            raise SourceError(f"source {self.name!r}: {what} did not return a resource")
        return resource

    async def _get_json(self, url: str, params: Params | None, what: str,
                        missing_ok: bool = False) -> Any:
        try:
            response = await self._client.get(url, params=params)
        except httpx.HTTPError as exc:
            raise SourceError(f"source {self.name!r}: {what} failed: {type(exc).__name__} "
                              f"({self._origin})") from exc
        if missing_ok and response.status_code in (404, 410):
            return None
        if response.status_code != 200:
            raise SourceError(f"source {self.name!r}: {what} answered HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type")
            raise SourceError(f"source {self.name!r}: {what} is not valid JSON (HTTP 200, {kind})") from None

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._smart is not None:
            await self._smart.aclose()
