"""The HTTP endpoints `connector run` serves (`server:` in the config): verify → parse → hand over.

    POST /webhooks/paubox/<token>   Paubox webhook events (Paubox does not sign: a secret path token and an
                                    optional source-IP allowlist authenticate the caller)

`/livez`, `/healthz` and `/metrics` come from connector.monitor, FHIR notifications from
connector.sources.subscriptions and CRM webhooks from connector.crm.receiver, as `extra_routes`.

No mapping logic here. Bodies are PHI: they are never logged; rejections are counted and logged by reason.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from connector import jsontext, metrics
from connector.aftercare import Aftercare
from connector.config import Config
from connector.errors import ConnectorError

log = structlog.get_logger("connector.web")


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
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
            from connector.logs import where

            log.error("request.crashed", endpoint=_endpoint(request), problem=where(exc))
            return JSONResponse(
                {"type": "about:blank", "title": "Internal Server Error", "status": 500},
                status_code=500,
                media_type="application/problem+json",
            )

    return wrapper


_ENDPOINTS = frozenset({"webhooks/paubox", "webhooks/crm", "fhir", "healthz", "livez", "metrics"})


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


def create_app(config: Config, aftercare: Aftercare, extra_routes: list[Route] | None = None) -> Starlette:
    settings = config.delivery.paubox
    limit = config.server.max_body if config.server else 1_000_000

    async def paubox_webhook(request: Request) -> Response:
        endpoint = "paubox"
        expected = settings.webhook_token.get_secret_value() if settings.webhook_token else None
        given = request.path_params["token"]
        if expected is None or not hmac.compare_digest(given.encode(), expected.encode()):
            return problem(404, "Not Found", endpoint, "unknown path token")
        if not client_allowed(request, settings.webhook_allow_ips):
            return problem(403, "Forbidden", endpoint, "source address not allowed")
        try:
            body = await read_body(request, limit)
        except BodyTooLarge:
            return problem(413, "Content Too Large", endpoint, "body too large")
        try:
            event = loads(body)
        except ValueError as exc:  # jsontext.BadJson: a fixed reason
            return problem(400, "Bad Request", endpoint, str(exc))
        try:
            result = await aftercare.webhook(event)
        except ConnectorError:
            return problem(400, "Bad Request", endpoint, "not a Paubox webhook event")
        return JSONResponse({"result": result.outcome})

    routes = [
        Route("/webhooks/paubox/{token}", paubox_webhook, methods=["POST"]),
        *(extra_routes or []),
    ]
    return Starlette(routes=[Route(r.path, guarded(r.endpoint), methods=list(r.methods or ["GET"])) for r in routes])
