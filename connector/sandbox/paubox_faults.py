"""Faults of the local Paubox sandbox: scripted ones (`POST /_sandbox/faults`), random ones for long runs
(`Chaos`), and how its webhooks misbehave. Each send request draws at most one `Fault`; `apply_fault`
turns it into the answer (after keeping the message when the fault says it was accepted)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import HTMLResponse, JSONResponse, Response

BAD_GATEWAY_HTML = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"


@dataclass
class Fault:
    status: int | None = None  # answer with this status
    accept: bool = False  # keep the message before answering (the "accepted, then lost the answer" cases)
    hang: float | None = None  # wait this long before answering (a client read timeout fires first)
    retry_after: float | None = None
    html: bool = False  # an HTML body instead of a JSON one
    close: bool = False  # start the answer, then drop the connection (the client sees a broken response)
    count: int = 1


@dataclass
class WebhookFaults:
    """How the sandbox's webhooks misbehave (Paubox's are best-effort: no retries, no order)."""

    drop: int = 0  # the next N events are never sent
    duplicate: bool = False  # every event is sent twice
    reorder: bool = False  # a message's events are sent newest first
    delay: float = 0.0  # seconds before sending


@dataclass
class Chaos:
    """Random faults for long runs (`connector sandbox --chaos`): each send request draws one outcome."""

    server_error: float = 0.0  # HTTP 500 before accepting
    accepted_500: float = 0.0  # accepted, then HTTP 500 (the message exists)
    rate_limit: float = 0.0  # HTTP 429 with Retry-After: 1
    hang: float = 0.0  # accepted, then no answer for `hang_seconds`
    hang_seconds: float = 30.0
    drop_webhook: float = 0.0  # a webhook event is never sent
    seed: int | None = None

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def draw(self) -> Fault | None:
        roll = self._random.random()
        choices = (
            (self.server_error, Fault(status=500)),
            (self.accepted_500, Fault(status=500, accept=True)),
            (self.rate_limit, Fault(status=429, retry_after=1)),
            (self.hang, Fault(hang=self.hang_seconds, accept=True)),
        )
        for chance, fault in choices:
            if roll < chance:
                return fault
            roll -= chance
        return None

    def drops_webhook(self) -> bool:
        return self._random.random() < self.drop_webhook


def errors(status: int, title: str, details: str, slug: str | None = None) -> JSONResponse:
    error: dict[str, Any] = {"code": status, "title": title, "details": details}
    if slug:
        error["status"] = slug
    return JSONResponse({"errors": [error]}, status_code=status)


class _BrokenResponse(Response):
    """Announces a body it never finishes: the connection drops mid-answer."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"sourceTrackingId": "', "more_body": True})
        raise ConnectionAbortedError("sandbox fault: connection dropped after accepting")


async def apply_fault(fault: Fault | None, store: Callable[[], None]) -> Response | None:
    """The answer a fault gives instead of the normal one (None: answer normally); `store` keeps the message."""
    if fault is None:
        return None
    if fault.accept:
        store()
    if fault.hang:
        await asyncio.sleep(fault.hang)
    if fault.close:
        return _BrokenResponse()
    if fault.status is None:
        return None
    if fault.html:
        return HTMLResponse(BAD_GATEWAY_HTML, status_code=fault.status)
    headers = {"Retry-After": str(int(fault.retry_after))} if fault.retry_after is not None else None
    if fault.status == 200:
        return JSONResponse(
            {"errors": [{"code": 400, "title": "Bad Request", "details": "Fault injected"}]}, status_code=200
        )
    titles = {
        429: "Too Many Requests",
        500: "Internal Server Error",
        502: "Bad Gateway",
        503: "Service Unavailable",
        504: "Gateway Timeout",
        400: "Bad Request",
    }
    response = errors(fault.status, titles.get(fault.status, "Error"), "Fault injected by the sandbox")
    if headers:
        response.headers.update(headers)
    return response
