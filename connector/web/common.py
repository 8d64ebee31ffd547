"""What every endpoint of `connector run` shares: bodies read within a limit, JSON from strangers, RFC 9457
problem answers counted and logged by reason, the guard that turns an unexpected error into a bare 500, and
source-address allowlists.

Bodies are PHI: they are never logged; rejections are counted and logged by endpoint and reason.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from connector import jsontext, metrics
from connector.errors import ConnectorError
from connector.logs import where

log = structlog.get_logger("connector.web")


class RequestTooLarge(ConnectorError):
    """A request body is larger than `server.max_body` (answered 413, never read whole)."""


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge
    return bytes(body)


def loads(body: bytes) -> Any:
    """JSON from an untrusted body; ValueError (jsontext.BadJson) for nesting bombs, NaN, lone surrogates."""
    return jsontext.load(body)


def guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Answer 500 for an unexpected error inside the endpoint, logged by type and place only: no exception
    escapes to the server, whose traceback would quote it (and with it, possibly, request content).
    A client that went away before sending its whole body is no error: logged at info, nobody to answer."""

    async def wrapper(request: Request) -> Response:
        try:
            response: Response = await endpoint(request)
            return response
        except ClientDisconnect:
            metrics.inc("connector_client_disconnects_total", endpoint=_endpoint(request))
            log.info(
                "request.disconnected",
                endpoint=_endpoint(request),
                problem="the client left before its body was complete; nothing was processed",
            )
            return Response(status_code=400)  # never sent: the connection is gone
        except Exception as exc:  # noqa: BLE001 - the last line of defence of a receiver
            log.error("request.crashed", endpoint=_endpoint(request), problem=where(exc))
            return JSONResponse(
                {"type": "about:blank", "title": "Internal Server Error", "status": 500},
                status_code=500,
                media_type="application/problem+json",
            )

    return wrapper


_ENDPOINTS = frozenset({"webhooks/paubox", "webhooks/crm", "fhir", "healthz", "livez", "metrics", "links"})


def _endpoint(request: Request) -> str:
    """Which endpoint, from a fixed set (a path carries tokens and names a caller chose)."""
    parts = request.url.path.split("/")[1:3]
    name = "/".join(parts) if parts[:1] == ["webhooks"] else parts[0] if parts else ""
    return name if name in _ENDPOINTS else "other"


def problem(status: int, title: str, endpoint: str, reason: str) -> JSONResponse:
    """An RFC 9457 problem answer; counted and logged by endpoint and reason (never the body)."""
    metrics.refused(endpoint, reason)
    log.warning("request.rejected", endpoint=endpoint, status=status, reason=reason)
    return JSONResponse(
        {"type": "about:blank", "title": title, "status": status},
        status_code=status,
        media_type="application/problem+json",
    )


def client_allowed(request: Request, allowed: list[Any]) -> bool:
    if not allowed:
        return True
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in allowed)
