"""CRM webhook endpoints of `connector run`: verify → parse → store encrypted → answer.

    POST /webhooks/crm/<source>                 standard-webhooks, hubspot, hmac-json (signed)
    POST /webhooks/crm/<source>/<path_token>    salesforce-outbound (unsigned: the path token authenticates)

The answer is 2xx only once the events are committed to the inbox, so a crash after it loses nothing;
processing happens after, from the inbox. A repeated event id is acknowledged and stored once. Refusals:
401 (signature, secret, timestamp), 400 (body), 413 (size), 429 (rate, with Retry-After); each is counted
and logged by reason, never with the body. No 5xx for bad input.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from connector import jsontext, metrics
from connector.crm.parse import (
    BodyError,
    CrmEvent,
    parse_hmac_json,
    parse_hubspot,
    parse_salesforce_outbound,
    parse_standard_webhook,
    salesforce_ack,
)
from connector.crm.verify import SignatureError, verify_hmac, verify_hubspot_v3, verify_standard_webhook
from connector.errors import ConfigError
from connector.web.common import RequestTooLarge, problem, read_body

if TYPE_CHECKING:
    from connector.config import Config
    from connector.config.sources import CrmSourceConfig
    from connector.crm.inbox import Keyring
    from connector.ledger.abc import Inbox
    from connector.models import Clock

log = structlog.get_logger("connector.crm")
MAX_ID, MAX_TYPE = 200, 100  # the inbox columns; longer ones are refused, never cut (ids are dedup keys)


@dataclass
class TokenBucket:
    rate: float
    burst: int
    tokens: float = -1.0
    stamp: float = field(default_factory=time.monotonic)

    def take(self) -> float | None:
        """None if a request may go now, else the seconds to wait."""
        now = time.monotonic()
        if self.tokens < 0:
            self.tokens = float(self.burst)
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        return (1 - self.tokens) / self.rate


def verify(
    settings: CrmSourceConfig, request_url: str, method: str, headers: dict[str, str], body: bytes, now: float
) -> None:
    """Raise SignatureError unless the request is authentic and fresh for this source."""
    tolerance = settings.tolerance.total_seconds()
    secret = settings.secret.get_secret_value() if settings.secret else ""
    if settings.kind == "standard-webhooks":
        verify_standard_webhook(secret, headers, body, now, tolerance)
    elif settings.kind == "hubspot":
        verify_hubspot_v3(
            secret, method, settings.public_url or request_url, headers, body, int(now * 1000), int(tolerance * 1000)
        )
    elif settings.kind == "hmac-json":
        value = next((v for k, v in headers.items() if k.lower() == settings.hmac_header.lower()), None)
        verify_hmac(secret.encode(), value, body, settings.hmac_prefix, settings.hmac_encoding)


def parse(settings: CrmSourceConfig, headers: dict[str, str], body: bytes) -> list[CrmEvent]:
    if settings.kind == "standard-webhooks":
        return parse_standard_webhook(headers, body)
    if settings.kind == "hubspot":
        return parse_hubspot(body)
    if settings.kind == "salesforce-outbound":
        return parse_salesforce_outbound(body, settings.organization_id)
    return parse_hmac_json(body, settings.id_path, settings.type_path)


class CrmReceiver:
    def __init__(self, config: Config, inbox: Inbox, keyring: Keyring, clock: Clock) -> None:
        self.config = config
        self.inbox = inbox
        self.keyring = keyring
        self.clock = clock
        self.buckets = {name: TokenBucket(s.rate_limit, s.burst) for name, s in config.crm.items()}

    def routes(self) -> list[Route]:
        return [
            Route("/webhooks/crm/{source}", self.receive, methods=["POST"]),
            Route("/webhooks/crm/{source}/{token}", self.receive, methods=["POST"]),
        ]

    async def receive(self, request: Request) -> Response:
        name = request.path_params["source"]
        settings = self.config.crm.get(name)
        endpoint = f"crm:{name}" if settings else "crm"
        if settings is None:
            return problem(404, "Not Found", "crm", "unknown source")
        token = request.path_params.get("token")
        if settings.kind == "salesforce-outbound":
            expected = settings.path_token.get_secret_value() if settings.path_token else ""
            if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
                return problem(401, "Unauthorized", endpoint, "bad path token")
        elif token is not None:
            return problem(404, "Not Found", endpoint, "unexpected path")
        limit = self.config.server.max_body if self.config.server else 1_000_000
        try:
            body = await read_body(request, limit)
        except RequestTooLarge:
            return problem(413, "Content Too Large", endpoint, "body too large")
        headers = dict(request.headers)
        try:
            verify(settings, str(request.url), request.method, headers, body, time.time())
        except SignatureError as exc:
            return problem(401, "Unauthorized", endpoint, exc.reason)
        except ConfigError:
            return problem(401, "Unauthorized", endpoint, "the configured secret is unusable")
        wait = self.buckets[name].take()  # after verification: strangers cannot use up a sender's budget
        if wait is not None:
            response = problem(429, "Too Many Requests", endpoint, "rate limited")
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
        try:
            events = parse(settings, headers, body)
        except BodyError as exc:
            return problem(400, "Bad Request", endpoint, str(exc)[:100])
        if any(len(e.event_id) > MAX_ID or len(e.event_type) > MAX_TYPE for e in events):
            return problem(400, "Bad Request", endpoint, "event id or type too long")
        if not all(jsontext.storable(e.event_id) and jsontext.storable(e.event_type) for e in events):
            return problem(400, "Bad Request", endpoint, "event id or type holds control characters")
        stored = await self.inbox.add(self._rows(name, events, self.clock()))
        metrics.inc("connector_crm_events_total", amount=len(events), source=name)
        log.info("crm.received", source=name, events=len(events), new=stored)
        if settings.kind == "salesforce-outbound":
            return Response(salesforce_ack(True), media_type="text/xml; charset=utf-8")
        return Response(status_code=204)

    def _rows(self, name: str, events: list[CrmEvent], now: datetime) -> list[dict[str, object]]:
        rows = []
        for event in events:
            payload = {
                "event_id": event.event_id,
                "event_type": event.event_type,
                "object_id": event.object_id,
                "occurred_at": event.occurred_at,
                "payload": event.payload,
            }
            key_id, sealed = self.keyring.seal(name, event.event_id, payload)
            rows.append(
                {
                    "source": name,
                    "event_id": event.event_id,
                    "event_type": event.event_type,
                    "received_at": now,
                    "key_id": key_id,
                    "sealed": sealed,
                }
            )
        return rows
