"""Paubox webhooks: `POST /webhooks/paubox/<token>`. Paubox does not sign its webhooks: a secret path token
and an optional source-address allowlist authenticate the caller. The event goes to aftercare
(connector.sending.aftercare), which confirms and updates the notification it names."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from connector.errors import ConnectorError
from connector.web.common import RequestTooLarge, client_allowed, loads, problem, read_body

if TYPE_CHECKING:
    from connector.config import Config
    from connector.sending.aftercare import Aftercare


def routes(config: Config, aftercare: Aftercare) -> list[Route]:
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
        except RequestTooLarge:
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

    return [Route("/webhooks/paubox/{token}", paubox_webhook, methods=["POST"])]
