"""Writes to a FHIR R4 server: what write-back (AppointmentResponse, an Appointment's cancellation,
Communication, Task) asks of the EHR. Only I/O lives here; what to write is decided elsewhere.

    writer = FhirWriter(source)  # the source's own client: its auth, limits and origin rule
    written = await writer.create(response, if_none_exist=f"identifier={system}|{value}", what="confirm")
    current = await writer.read("Appointment", "123")  # the resource and its version
    await writer.update(changed, version=current.version, what="cancel")  # If-Match: W/"<version>"

A write is sent once and never retried here: the caller keeps the intent in the ledger and tries again
later. That is safe because every create is conditional on an identifier the connector derives from its own
record (a second identical create finds the first: HTTP 200, nothing new), and every update names the
version it was decided on (a stale one answers 412 and changes nothing). How a write can end:

- `Written`: created (201), or found by its identifier (200, `created` False), or updated;
- `StaleVersion`: an update named an old version (412): read again, decide again, never overwrite blindly;
- `WriteRefused`: the server refused it (400, 401, 403, 404, 405, 409, 412 on a create — several resources
  match the identifier —, 422, ...): the same write would be refused again, a person must look;
- `SourceError` (the parent of both): no answer, a timeout, 429 or a 5xx: the write may or may not have
  happened; trying again later is safe for the reasons above.

`capabilities()` reads the server's CapabilityStatement once: whether it creates conditionally and updates
by version, per resource type. A server that does neither cannot promise one write per intent; callers
refuse write-back for it with a clear message rather than risk duplicates in the chart.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from connector.errors import SourceError

if TYPE_CHECKING:
    from connector.sources.fhir_poll import FhirPollSource

FHIR_JSON = "application/fhir+json"
REFUSED = frozenset({400, 401, 403, 404, 405, 406, 409, 410, 412, 415, 422})
_VERSION_IN_LOCATION = re.compile(r"/([A-Za-z]+)/([A-Za-z0-9\-.]{1,64})/_history/([A-Za-z0-9\-.]{1,64})/?$")
_ETAG = re.compile(r'^(?:W/)?"([^"]{1,64})"$')


class WriteRefused(SourceError):
    """The server refused a write (a 4xx): sending it again would be refused again. `status` is the HTTP
    status; the message names the source, the write and the status, never the body."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class StaleVersion(SourceError):
    """An update's If-Match named a version that is no longer current (412): read again, decide again."""


@dataclass(frozen=True)
class Written:
    """A write the server accepted. `created`: False when a conditional create found an existing resource."""

    resource_type: str
    id: str
    version: str | None
    created: bool
    resource: dict[str, Any] | None = None  # the body, when the server returned it


@dataclass(frozen=True)
class Versioned:
    """A resource as read, with the version an update must name (ETag, else meta.versionId)."""

    resource: dict[str, Any]
    version: str | None


@dataclass(frozen=True)
class Capabilities:
    """What a server says it can do with writes, per resource type (from its CapabilityStatement)."""

    conditional_create: frozenset[str] = field(default_factory=frozenset)
    versioned_update: frozenset[str] = field(default_factory=frozenset)
    interactions: dict[str, frozenset[str]] = field(default_factory=dict)

    def can(self, resource_type: str, interaction: str) -> bool:
        return interaction in self.interactions.get(resource_type, frozenset())


def capabilities_of(statement: Any) -> Capabilities:
    """Pure: read the write capabilities out of a CapabilityStatement (anything else gives none)."""
    conditional: set[str] = set()
    versioned: set[str] = set()
    interactions: dict[str, frozenset[str]] = {}
    rests = statement.get("rest") if isinstance(statement, dict) else None
    for rest in rests if isinstance(rests, list) else []:
        if not isinstance(rest, dict) or rest.get("mode", "server") != "server":
            continue
        for entry in rest.get("resource") or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
                continue
            kind = entry["type"]
            codes = {i.get("code") for i in entry.get("interaction") or [] if isinstance(i, dict)}
            interactions[kind] = frozenset(c for c in codes if isinstance(c, str))
            if entry.get("conditionalCreate") is True:
                conditional.add(kind)
            if entry.get("versioning") == "versioned-update":
                versioned.add(kind)
    return Capabilities(frozenset(conditional), frozenset(versioned), interactions)


def version_of(headers: httpx.Headers, body: dict[str, Any] | None) -> str | None:
    """The version a server gave a resource: its ETag (`W/"3"`), else `meta.versionId`, else the one in
    `Location` (`…/_history/3`)."""
    match = _ETAG.match(headers.get("etag", "").strip())
    if match:
        return match.group(1)
    meta = body.get("meta") if isinstance(body, dict) else None
    if isinstance(meta, dict) and isinstance(meta.get("versionId"), str):
        return str(meta["versionId"])
    located = _VERSION_IN_LOCATION.search(headers.get("location", "").strip())
    return located.group(3) if located else None


def _id_of(headers: httpx.Headers, body: dict[str, Any] | None) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("id"), str):
        return str(body["id"])
    located = _VERSION_IN_LOCATION.search(headers.get("location", "").strip())
    if located:
        return located.group(2)
    parts = headers.get("location", "").rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-1] else None


class FhirWriter:
    """Writes through a source's own HTTP client (`FhirPollSource.exchange`): the same credentials, limits,
    deadline and origin rule as its reads. The SMART scopes writes need are requested by the source
    (`sources.<name>.write_back.scope`)."""

    def __init__(self, source: FhirPollSource) -> None:
        self.source = source
        self._capabilities: Capabilities | None = None

    @property
    def name(self) -> str:
        return self.source.name

    async def capabilities(self) -> Capabilities:
        """The server's write capabilities, read once (`GET metadata`)."""
        if self._capabilities is None:
            statement = await self.source.get_json("metadata", None, "CapabilityStatement read")
            self._capabilities = capabilities_of(statement)
        return self._capabilities

    async def read(self, resource_type: str, resource_id: str) -> Versioned | None:
        """The current version of a resource (None: gone), with the version an update must name."""
        what = f"read of {resource_type}/{resource_id} before a write"
        reply = await self._send("GET", f"{resource_type}/{resource_id}", what)
        if reply.status_code in (404, 410):
            return None
        if reply.status_code != 200:
            raise self._failure(reply.status_code, what)
        body = self._body(reply.content, what)
        if body is None or body.get("resourceType") != resource_type:
            raise SourceError(f"source {self.name!r}: {what} did not return a {resource_type}")
        return Versioned(body, version_of(reply.headers, body))

    async def create(self, resource: dict[str, Any], *, if_none_exist: str | None, what: str) -> Written:
        """POST the resource; with `if_none_exist` (`identifier=system|value`) the server creates it only
        if no resource matches (HTTP 200 and the existing one otherwise)."""
        resource_type = str(resource.get("resourceType"))
        headers = {"Content-Type": FHIR_JSON, "Prefer": "return=representation"}
        if if_none_exist is not None:
            headers["If-None-Exist"] = if_none_exist
        reply = await self._send("POST", resource_type, what, body=resource, headers=headers)
        if reply.status_code not in (200, 201):
            raise self._failure(reply.status_code, what)
        body = self._body(reply.content, what)
        found = _id_of(reply.headers, body)
        if found is None:
            raise SourceError(f"source {self.name!r}: {what} answered HTTP {reply.status_code} without an id")
        return Written(resource_type, found, version_of(reply.headers, body), reply.status_code == 201, body)

    async def update(self, resource: dict[str, Any], *, version: str | None, what: str) -> Written:
        """PUT the resource; with `version`, only if that is still the current one (`If-Match`), else
        StaleVersion. Without a version the update is unconditional: callers that decided on what they read
        always give one."""
        resource_type, resource_id = str(resource.get("resourceType")), str(resource.get("id"))
        headers = {"Content-Type": FHIR_JSON, "Prefer": "return=representation"}
        if version is not None:
            headers["If-Match"] = f'W/"{version}"'
        reply = await self._send("PUT", f"{resource_type}/{resource_id}", what, body=resource, headers=headers)
        if reply.status_code == 412 and version is not None:
            raise StaleVersion(
                f"source {self.name!r}: {what}: {resource_type}/{resource_id} changed since version {version} "
                "was read (HTTP 412)"
            )
        if reply.status_code not in (200, 201):
            raise self._failure(reply.status_code, what)
        body = self._body(reply.content, what)
        return Written(resource_type, resource_id, version_of(reply.headers, body), reply.status_code == 201, body)

    async def _send(
        self,
        method: str,
        url: str,
        what: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        content = None if body is None else json.dumps(body, ensure_ascii=False).encode()
        try:
            return await self.source.exchange(method, url, None, what, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise SourceError(f"source {self.name!r}: {what} failed: {type(exc).__name__}") from exc

    def _failure(self, status: int, what: str) -> SourceError:
        if status in REFUSED:
            return WriteRefused(f"source {self.name!r}: {what} was refused (HTTP {status})", status)
        return SourceError(f"source {self.name!r}: {what} answered HTTP {status}; it may or may not have been done")

    def _body(self, content: bytes | bytearray, what: str) -> dict[str, Any] | None:
        if not content.strip():
            return None
        try:
            body = json.loads(content)
        except ValueError:
            raise SourceError(f"source {self.name!r}: {what} answered with a body that is not JSON") from None
        return body if isinstance(body, dict) else None
