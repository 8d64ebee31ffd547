"""FHIR R4 source: how the connector reads a server. Only I/O lives here (HTTP, auth, paging, retries,
JSON); what a page means is decided in connector.intake.

Three ways to find changed appointments, chosen per source (`strategy`):

    last-updated  Appointment?_lastUpdated=ge{cursor - overlap}&_sort=_lastUpdated&_include=Appointment:patient
    history       Appointment/_history?_since={cursor - overlap}   (includes DELETE entries)
    date-window   Appointment?date=ge{now - past}&date=lt{now + future}[&patient|practitioner|location=…]
                  (Epic- and Oracle Health-style servers; split into requests the server accepts)

Reads are retried with backoff on 429, 5xx and network errors (Retry-After honoured); a source never has
more than `max_connections` requests in flight. Errors are SourceError naming the source, the request
kind and the HTTP status: never a body.

Every request is bounded (`limits`, `timeout`): a body is read as a stream and abandoned past
`max_response_size`; connection, headers and body together must finish within `timeout`; a poll reads at
most `max_pages` pages (a small search `max_search_pages`); a `next` link must stay on the scheme, host and
port of `base_url` and must not lead back to a page this poll has read. A breach is a SourceLimitError
naming the source, the request and the setting (counted as connector_source_limit_breaches_total), never
retried within the poll: the poll fails, its cursor stays where the last completed page left it, and the
next poll tries again. Credentials (bearer, basic, SMART) are only ever sent to the origin of `base_url`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import structlog

from connector import metrics
from connector.config.sources import BasicAuth, BearerAuth, FhirPollSourceConfig, SmartAuth
from connector.errors import ResourceError, SourceError
from connector.fhir import SearchPage, split_search_bundle
from connector.sources.bounded import BodyTooLarge, Reply, SourceLimitError, capped, fetch
from connector.sources.smart import SmartBackendAuth
from connector.units import human_duration
from connector.urls import origin, show_origin

Params = list[tuple[str, Any]]
RETRIED = frozenset({429, 500, 502, 503, 504})
log = structlog.get_logger("connector.sources.fhir")


def fhir_instant(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after", "")
    return float(value) if value.replace(".", "", 1).isdigit() else None


@dataclass
class PageBudget:
    """The pages one poll (or one small search) may read: `setting` names the limit in the config."""

    setting: str
    limit: int
    used: int = 0


class FhirPollSource:
    """One configured FHIR server. `transport` lets tests put any httpx transport underneath; `tasks`: hand-offs
    are FHIR Tasks on this server, so the SMART token asks for their scopes too (see `token_scope`)."""

    def __init__(
        self,
        name: str,
        config: FhirPollSourceConfig,
        transport: httpx.AsyncBaseTransport | None = None,
        tasks: bool = False,
    ) -> None:
        self.name = name
        self.config = config
        headers = {"Accept": "application/fhir+json"}
        auth: httpx.Auth | None = None
        self._smart: SmartBackendAuth | None = None
        self._max_bytes, self._deadline = int(config.limits.max_response_size), config.timeout.total_seconds()
        if isinstance(config.auth, BearerAuth):
            headers["Authorization"] = f"Bearer {config.auth.token.get_secret_value()}"
        elif isinstance(config.auth, BasicAuth):
            auth = httpx.BasicAuth(config.auth.username, config.auth.password.get_secret_value())
        elif isinstance(config.auth, SmartAuth):
            self._smart = auth = SmartBackendAuth(
                fhir_base_url=config.base_url,
                client_id=config.auth.client_id,
                private_key_pem=config.auth.private_key.get_secret_value().encode(),
                key_id=config.auth.key_id,
                algorithm=config.auth.algorithm,
                scope=config.token_scope(tasks),
                token_endpoint=config.auth.token_endpoint,
                transport=transport,
                timeout=self._deadline,
                max_bytes=self._max_bytes,
                source=name,
            )
        self._base = httpx.URL(config.base_url + "/")
        self._origin = origin(self._base)
        self._client = httpx.AsyncClient(
            base_url=self._base,
            headers=headers,
            auth=auth,
            timeout=self._deadline,
            transport=transport,
            event_hooks={"response": [capped(self._max_bytes)]},
            limits=httpx.Limits(
                max_connections=config.max_connections, max_keepalive_connections=config.max_connections
            ),
        )
        self._in_flight = asyncio.Semaphore(config.max_connections)

    @property
    def smart(self) -> SmartBackendAuth | None:
        """The SMART Backend Services auth of this source, when it uses one (`connector check` asks it for a
        token)."""
        return self._smart

    # -- what to ask --------------------------------------------------------------------------------------

    def search_params(self, since: datetime | None, until: datetime | None = None) -> Params:
        params: Params = []
        if since is not None:
            params.append(("_lastUpdated", f"ge{fhir_instant(since)}"))
        if until is not None:
            params.append(("_lastUpdated", f"le{fhir_instant(until)}"))
        params += [
            ("_sort", "_lastUpdated"),
            ("_include", "Appointment:patient"),
            ("_count", str(self.config.page_size)),
        ]
        return params

    def window_queries(self, start: datetime, end: datetime) -> list[Params]:
        """The date-window searches: one per chunk of each configured id list (servers such as Oracle
        Health accept one kind of reference per request, with comma lists), or one for everything."""
        dates: Params = [
            ("date", f"ge{fhir_instant(start)}"),
            ("date", f"lt{fhir_instant(end)}"),
            ("_count", str(self.config.page_size)),
        ]
        scope = self.config.window.scope
        queries: list[Params] = []
        for name, ids in (
            ("patient", scope.patients),
            ("practitioner", scope.practitioners),
            ("location", scope.locations),
        ):
            size = self.config.window.chunk
            for index in range(0, len(ids), size):
                queries.append([(name, ",".join(ids[index : index + size])), *dates])
        return queries or [dates]

    # -- paging -------------------------------------------------------------------------------------------

    def _poll_budget(self) -> PageBudget:
        return PageBudget("max_pages", self.config.limits.max_pages)

    async def pages(self, since: datetime | None, until: datetime | None = None) -> AsyncIterator[SearchPage]:
        """Appointments changed since `since` (and up to `until`), following `next` links verbatim."""
        async for page in self._follow(
            "Appointment", self.search_params(since, until), "Appointment search", self._poll_budget()
        ):
            yield page

    async def window_pages(self, start: datetime, end: datetime) -> AsyncIterator[SearchPage]:
        budget = self._poll_budget()  # one poll, several searches: the pages of all of them count
        for number, params in enumerate(self.window_queries(start, end), start=1):
            async for page in self._follow("Appointment", params, f"Appointment date-window search {number}", budget):
                yield page

    async def history_pages(self, since: datetime | None) -> AsyncIterator[SearchPage]:
        """`Appointment/_history?_since=`: versions newest first, DELETE entries without a resource."""
        params: Params = [("_count", str(self.config.page_size))]
        if since is not None:
            params.insert(0, ("_since", fhir_instant(since)))
        async for page in self._follow(
            "Appointment/_history", params, "Appointment history", self._poll_budget(), history=True
        ):
            yield page

    async def _follow(
        self, url: str, params: Params, what: str, budget: PageBudget, history: bool = False, read_ahead: bool = True
    ) -> AsyncGenerator[SearchPage, None]:
        """Pages one after the other. With `read_ahead`, the next page is requested while the caller handles
        this one (a poll commits page N before it asks for page N + 1, so its cursor never runs ahead). A
        `next` link that breaks a rule ends the pages with a SourceLimitError, after the page that holds it."""

        def fetch_page(page_url: str, number: int) -> asyncio.Task[Any]:
            return asyncio.create_task(self.get_json(page_url, None, f"{what} page {number}"))

        visited: set[str] = set()
        number = 1
        ahead: asyncio.Task[Any] | None = fetch_page(self._page_url(url, params, what, budget, visited), number)
        try:
            while ahead is not None:
                bundle, ahead = await ahead, None
                try:
                    page = history_page(bundle) if history else split_search_bundle(bundle, url.split("/")[0])
                except ResourceError as exc:
                    raise SourceError(f"source {self.name!r}: {what} page {number}: {exc}") from None
                following, refused = None, None
                if page.next_url:
                    try:
                        following = self._page_url(page.next_url, None, f"{what} page {number}", budget, visited)
                    except SourceLimitError as exc:
                        refused = exc
                if following is not None and read_ahead:
                    ahead = fetch_page(following, number + 1)
                yield page
                if refused is not None:
                    raise refused
                if following is not None and ahead is None:
                    ahead = fetch_page(following, number + 1)
                number += 1
        finally:
            if ahead is not None:  # the caller stopped early or failed: the page read ahead is not wanted
                ahead.add_done_callback(lambda task: task.cancelled() or task.exception())
                ahead.cancel()

    def _page_url(self, url: str, params: Params | None, what: str, budget: PageBudget, visited: set[str]) -> str:
        """The absolute URL of the next page to read, once it passed the rules: the origin of `base_url`, not
        read before in this poll, within the page budget. `what` names the page whose link this is."""
        target = self._client.build_request("GET", url, params=params).url
        if origin(target) != self._origin:
            raise self._breach(
                "next_link_origin",
                f"{what} links to {show_origin(target)}, not "
                f"{show_origin(self._base)}: refusing to send this source's credentials there",
            )
        if str(target) in visited:
            raise self._breach(
                "next_link_loop", f"{what} links back to a page already read in this poll (a loop of next links)"
            )
        if budget.used >= budget.limit:
            raise self._breach(
                budget.setting,
                f"{what} links to more than {budget.limit} pages (sources.{self.name}.limits.{budget.setting})",
            )
        visited.add(str(target))
        budget.used += 1
        return str(target)

    def _breach(self, limit: str, problem: str) -> SourceLimitError:
        metrics.inc("connector_source_limit_breaches_total", source=self.name, limit=limit)
        return SourceLimitError(f"source {self.name!r}: {problem}", limit)

    async def search(self, resource_type: str, params: Params, limit_pages: int | None = None) -> list[dict[str, Any]]:
        """Every match of a small search (a patient's Consents, say); more pages than
        `limits.max_search_pages` is a SourceLimitError. `limit_pages` reads only that many pages, quietly
        (a best-effort read, such as an `_id` prefetch)."""
        found: list[dict[str, Any]] = []
        budget = PageBudget("max_search_pages", self.config.limits.max_search_pages)
        async with contextlib.aclosing(
            self._follow(resource_type, params, f"{resource_type} search", budget, read_ahead=False)
        ) as pages:
            read = 0
            async for page in pages:
                found += [m for m in page.matches if isinstance(m, dict)]
                read += 1
                if read == limit_pages:
                    break
        return found

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The current version of a resource, or None when the server says it is gone (404/410)."""
        what = f"read of {resource_type}/{resource_id}"
        resource = await self.get_json(f"{resource_type}/{resource_id}", None, what, missing_ok=True)
        if resource is not None and not isinstance(resource, dict):
            raise SourceError(f"source {self.name!r}: {what} did not return a resource")
        return resource

    async def post(self, url: str, body: dict[str, Any], what: str, method: str = "POST") -> Any:
        """A write (creating a Subscription, say): not retried."""
        try:
            reply = await self.exchange(
                method, url, None, what, json=body, headers={"Content-Type": "application/fhir+json"}
            )
        except httpx.HTTPError as exc:
            raise SourceError(f"source {self.name!r}: {what} failed: {type(exc).__name__}") from exc
        if reply.status_code not in (200, 201):
            raise SourceError(f"source {self.name!r}: {what} answered HTTP {reply.status_code}")
        try:
            return json.loads(reply.content)
        except ValueError:
            return None

    async def exchange(self, method: str, url: str, params: Params | None, what: str, **kwargs: Any) -> Reply:
        """One request within the limits, to the origin of `base_url` only (reads here, writes through
        connector.sources.fhir_write)."""
        request = self._client.build_request(method, url, params=params, **kwargs)
        if origin(request.url) != self._origin:
            raise self._breach(
                "origin",
                f"{what}: refusing to send this source's credentials to "
                f"{show_origin(request.url)} (not {show_origin(self._base)})",
            )
        try:
            async with self._in_flight:
                return await fetch(self._client, request, max_bytes=self._max_bytes, deadline=self._deadline)
        except BodyTooLarge:
            raise self._breach(
                "max_response_size",
                f"{what}: the response is larger than "
                f"{self.config.limits.max_response_size.human_readable()} "
                f"(sources.{self.name}.limits.max_response_size); not read further",
            ) from None
        except TimeoutError:
            raise self._breach(
                "timeout",
                f"{what} did not complete within {human_duration(self.config.timeout)} "
                f"(sources.{self.name}.timeout: connection, headers and the whole body)",
            ) from None

    async def get_json(self, url: str, params: Params | None, what: str, missing_ok: bool = False) -> Any:
        settings = self.config.retries
        for attempt in range(1, settings.attempts + 1):
            delay: float | None = None
            try:
                reply = await self.exchange("GET", url, params, what)
            except httpx.HTTPError as exc:
                if attempt == settings.attempts:
                    raise SourceError(
                        f"source {self.name!r}: {what} failed: {type(exc).__name__} ({show_origin(self._base)})"
                    ) from exc
                problem = type(exc).__name__
            else:
                if missing_ok and reply.status_code in (404, 410):
                    return None
                if reply.status_code == 200:
                    try:
                        return json.loads(reply.content)
                    except ValueError:
                        kind = reply.headers.get("content-type", "no content type")
                        raise SourceError(
                            f"source {self.name!r}: {what} is not valid JSON (HTTP 200, {kind})"
                        ) from None
                if reply.status_code not in RETRIED or attempt == settings.attempts:
                    raise SourceError(f"source {self.name!r}: {what} answered HTTP {reply.status_code}")
                problem, delay = f"HTTP {reply.status_code}", _retry_after(reply.headers)
            wait = min(
                settings.backoff_max.total_seconds(),
                max(delay or 0.0, random.uniform(0, settings.backoff.total_seconds() * 2 ** (attempt - 1))),
            )
            log.warning(
                "source.retry", source=self.name, request=what, problem=problem, attempt=attempt, delay_s=round(wait, 2)
            )
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._smart is not None:
            await self._smart.aclose()


def history_page(bundle: Any) -> SearchPage:
    """A history Bundle as a page: resources (with their request method) and DELETE entries, which carry no
    resource: they become `{"resourceType", "id", "_deleted": True, "meta": {"lastUpdated"}}` stubs."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ResourceError("the page is not a FHIR Bundle")
    page = split_search_bundle({**bundle, "entry": []})
    entries = bundle.get("entry")
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        request: dict[str, Any] = entry["request"] if isinstance(entry.get("request"), dict) else {}
        resource = entry.get("resource")
        if request.get("method") == "DELETE" and not isinstance(resource, dict):
            parts = str(request.get("url") or entry.get("fullUrl") or "").split("/_history/")[0].rstrip("/").split("/")
            if len(parts) >= 2 and parts[-2] == "Appointment" and parts[-1]:
                response: dict[str, Any] = entry["response"] if isinstance(entry.get("response"), dict) else {}
                page.matches.append(
                    {
                        "resourceType": "Appointment",
                        "id": parts[-1],
                        "_deleted": True,
                        "meta": {"lastUpdated": response.get("lastModified")},
                    }
                )
        elif isinstance(resource, dict):
            page.matches.append(resource)
    return page
