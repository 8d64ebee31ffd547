"""Hostile behaviours of the FHIR test server, to show that a poller's limits hold. Set with the fault
profile (`POST /_test/faults`); they change search and history pages only, and none is on by default:

    {"next_loop": true}         every page's `next` link points back to the page itself
    {"endless_pages": true}     past the real results, every search page links to one more page of
                                invented appointments, forever
    {"huge_bundle_mb": 200}     pages answer a Bundle of that many MB, generated chunk by chunk while it is
                                sent (never built in memory), without a Content-Length
    {"drip_seconds": 5}         pages answer their Bundle one byte every N seconds
    {"next_origin": "http://127.0.0.1:8091"}
                                `next` links keep their path and query but point to this scheme, host and port
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from starlette.responses import StreamingResponse

FHIR_JSON = "application/fhir+json"
CHUNK = 64 * 1024
Resource = dict[str, Any]


@dataclass(frozen=True)
class Hostility:
    next_loop: bool = False
    endless_pages: bool = False
    huge_bundle_mb: float = 0.0
    drip_seconds: float = 0.0
    next_origin: str | None = None

    @classmethod
    def from_profile(cls, body: dict[str, Any]) -> Hostility:
        """The hostile knobs of a fault profile (absent: off). ValueError for a value that is not usable."""
        origin = body.get("next_origin")
        if origin is not None:
            url = httpx.URL(str(origin))
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError("next_origin must be a scheme, host and port such as http://127.0.0.1:8091")
        return cls(
            next_loop=bool(body.get("next_loop", False)),
            endless_pages=bool(body.get("endless_pages", False)),
            huge_bundle_mb=max(0.0, float(body.get("huge_bundle_mb", 0))),
            drip_seconds=max(0.0, float(body.get("drip_seconds", 0))),
            next_origin=None if origin is None else str(origin),
        )

    def invented(self, start: int, count: int) -> list[Resource]:
        """`count` appointments that exist only on this page (ids numbered from `start`), booked in 3 days."""
        when = datetime.now(UTC).replace(microsecond=0)
        start_at = when + timedelta(days=3)
        return [
            {
                "resourceType": "Appointment",
                "id": f"invented-{number}",
                "status": "booked",
                "meta": {"versionId": "1", "lastUpdated": when.isoformat().replace("+00:00", "Z")},
                "start": start_at.isoformat(),
                "end": (start_at + timedelta(hours=1)).isoformat(),
                "participant": [{"actor": {"reference": "Patient/invented"}, "status": "accepted"}],
            }
            for number in range(start, start + count)
        ]

    def next_link(self, next_url: str | None, this_url: str) -> str | None:
        """The `next` link to print on a page served at `this_url`."""
        if self.next_loop:
            return this_url
        if next_url is not None and self.next_origin is not None:
            target = httpx.URL(self.next_origin)
            return str(httpx.URL(next_url).copy_with(scheme=target.scheme, host=target.host, port=target.port))
        return next_url

    def streamed(self, bundle: Resource) -> StreamingResponse | None:
        """A page sent the hostile way (huge or dripping), or None to send `bundle` normally."""
        if self.huge_bundle_mb > 0:
            return StreamingResponse(_huge(bundle, int(self.huge_bundle_mb * 1_000_000)), media_type=FHIR_JSON)
        if self.drip_seconds > 0:
            return StreamingResponse(_drip(json.dumps(bundle).encode(), self.drip_seconds), media_type=FHIR_JSON)
        return None


async def _huge(bundle: Resource, size: int) -> AsyncIterator[bytes]:
    """`bundle` with invented entries appended until the body is about `size` bytes, one chunk at a time."""
    head = json.dumps({**{k: v for k, v in bundle.items() if k != "entry"}, "entry": []})
    yield head[:-2].encode()  # up to and including `"entry": [`
    sent, number = len(head), 0
    template = json.dumps(
        {"fullUrl": "Appointment/huge-{n}", "resource": Hostility().invented(0, 1)[0], "search": {"mode": "match"}}
    ).replace("invented-0", "huge-{n}")
    while sent < size:
        entries, length = [], 0
        while length < CHUNK:
            entries.append(("," if number else "") + template.replace("{n}", str(number)))
            length += len(entries[-1])
            number += 1
        chunk = "".join(entries).encode()
        sent += len(chunk)
        yield chunk
        await asyncio.sleep(0)  # let the server notice a client that went away
    yield b"]}"


async def _drip(body: bytes, seconds: float) -> AsyncIterator[bytes]:
    for index in range(len(body)):
        if index:
            await asyncio.sleep(seconds)
        yield body[index : index + 1]
