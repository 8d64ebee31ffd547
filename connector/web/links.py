"""Patients' links (connector.links): `GET|POST /links/<action>/<token>`, behind `server.public_url`.

A GET shows a page and never acts: mail scanners and link previewers fetch what is in an email. Only a POST
acts (connector.sending.actions), and a second POST answers like the first. An RFC 8058 one-click POST to an
unsubscribe link (body `List-Unsubscribe=One-Click`, form-encoded or multipart, no cookies) unsubscribes at
once and answers without a page. A refused link (expired, tampered, another action's, a retired key) gets a
friendly page and a 4xx. Everything is rate-limited per client (its address as `server.trusted_proxies`
lets it be judged: the nearest untrusted hop; an IPv6 client by its /64), except that a valid unsubscribe
POST past its client's limit is still taken, a few times per email (mailbox providers send many patients'
one-click POSTs from few addresses, and an unsubscribe must not be lost). Counted and logged by action and
outcome, never the token or anything about the patient.
"""

from __future__ import annotations

import email.parser
import email.policy
import ipaddress
import math
from collections import OrderedDict
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import structlog
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeout
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from connector import links, metrics
from connector.logs import where
from connector.sending.actions import Outcome
from connector.web.common import RequestTooLarge, read_body
from connector.web.crm import TokenBucket
from connector.web.link_pages import local_time, page

if TYPE_CHECKING:
    from datetime import datetime

    from starlette.requests import Request

    from connector.config import Config
    from connector.models import Clock
    from connector.sending.actions import PatientActions

log = structlog.get_logger("connector.links")
ENDPOINT = "links"
MAX_BODY = 16_384
_STATUS = {
    Outcome.DONE: 200,
    Outcome.STARTED: 409,
    Outcome.CANCELLED: 409,
    Outcome.SUPERSEDED: 409,
    Outcome.GONE: 404,
    Outcome.NOT_OFFERED: 403,
    Outcome.UNAVAILABLE: 503,
}


LINK_BURST, LINK_RATE = 3, 1 / 60  # one-click unsubscribes past their client's limit: per email
MAX_CLIENTS = 10_000  # buckets kept; the least recently seen client's goes first (it then starts full again)


class ClientBuckets:
    """One token bucket per client address, at most MAX_CLIENTS of them."""

    def __init__(self, rate: float, burst: int, size: int = MAX_CLIENTS) -> None:
        self.rate, self.burst, self.size = rate, burst, size
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, host: str) -> float | None:
        """None if this client may go now, else the seconds to wait."""
        client = _client_key(host)
        bucket = self.buckets.pop(client, None) or TokenBucket(self.rate, self.burst)
        self.buckets[client] = bucket
        if len(self.buckets) > self.size:
            self.buckets.popitem(last=False)
        return bucket.take()


def _client_key(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an address (a test client's name, a Unix socket): as it is
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def one_click(content_type: str, body: bytes) -> bool:
    """Whether a POST body is RFC 8058's `List-Unsubscribe=One-Click` (form-encoded or multipart/form-data)."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        for part in message.iter_parts() if message.is_multipart() else []:
            if part.get_param("name", header="content-disposition") == "List-Unsubscribe":
                # The bytes as sent: a part's declared type or charset (unknown, binary) must not matter.
                payload = part.get_payload(decode=True)
                return isinstance(payload, bytes) and payload.strip() == b"One-Click"
        return False
    fields = parse_qs(body.decode("utf-8", "replace"))
    return fields.get("List-Unsubscribe") == ["One-Click"]


class LinkEndpoints:
    def __init__(self, config: Config, actions: PatientActions, clock: Clock) -> None:
        assert config.links is not None  # the daemon adds these routes only with `links:`
        self.keys = links.LinkKeys.from_config(config.links)
        self.actions = actions
        self.clock = clock
        self.buckets = ClientBuckets(config.links.rate_limit, config.links.burst)
        self.per_link = ClientBuckets(LINK_RATE, LINK_BURST)  # by notification id

    def routes(self) -> list[Route]:
        return [Route("/links/{action}/{token}", self.handle, methods=["GET", "POST"])]

    def _busy(self, wait: float) -> Response:
        busy = self._refused(429, "rate limited", "busy")
        busy.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return busy

    def _refused(self, status: int, reason: str, message_key: str, lang: str = "en") -> Response:
        metrics.refused(ENDPOINT, reason)
        log.warning("link.rejected", status=status, reason=reason)
        return page(status, lang, message_key=message_key)

    async def handle(self, request: Request) -> Response:
        action = str(request.path_params["action"])
        wait = self.buckets.take(request.client.host if request.client else "")
        # Mailbox providers send many patients' one-click POSTs from few addresses: an unsubscribe over its
        # client's limit still goes through if its link is valid, a few times per email (LINK_BURST).
        unsubscribing = request.method == "POST" and action == "unsubscribe"
        if wait is not None and not unsubscribing:
            return self._busy(wait)
        if action not in links.ACTIONS:
            return self._refused(404, "unknown action", "invalid")
        now = self.clock()
        try:
            claim = links.verify(self.keys, str(request.path_params["token"]), action, now)
        except links.BadLink as exc:
            expired = exc.reason == "expired"
            return self._refused(410 if expired else 403, exc.reason, "expired" if expired else "invalid")
        if wait is not None:
            again = self.per_link.take(str(claim.notification))
            if again is not None:
                return self._busy(again)
        try:
            return await self._verified(request, action, claim, now)
        except (OperationalError, InterfaceError, SQLAlchemyTimeout) as exc:
            # The ledger is down: nothing was recorded (one transaction); the patient or the mailbox
            # provider may try again.
            log.error("link.ledger_unavailable", action=action, problem=where(exc))
            if request.method == "POST":
                metrics.inc("connector_patient_actions_total", action=action, outcome=Outcome.UNAVAILABLE.value)
            return page(503, claim.language, message_key=Outcome.UNAVAILABLE.value)

    async def _verified(self, request: Request, action: str, claim: links.Claim, now: datetime) -> Response:
        record = await self.actions.notification(claim.notification)
        if record is None:
            return self._refused(404, "unknown notification", "gone", claim.language)
        shown = self.actions.page(record)
        when = local_time(shown.start, claim.zone, claim.language)
        if request.method == "GET":  # shows, never acts
            return page(200, claim.language, clinic=shown.clinic, when=when, action=action, category=shown.category)
        try:
            body = await read_body(request, MAX_BODY)
        except RequestTooLarge:
            return self._refused(413, "too large", "invalid", claim.language)
        if action == "unsubscribe":
            quick = one_click(request.headers.get("content-type", ""), body)
            everything = not quick and parse_qs(body.decode("utf-8", "replace")).get("scope") == ["all"]
            outcome = await self.actions.unsubscribe(record, everything, now)
            log.info("link.used", action=action, outcome=outcome.value, one_click=quick)
            if quick:
                return PlainTextResponse(outcome.value, status_code=_STATUS[outcome])
        else:
            outcome = await self.actions.respond(record, action, now)
            log.info("link.used", action=action, outcome=outcome.value)
        metrics.inc("connector_patient_actions_total", action=action, outcome=outcome.value)
        message_key = f"done.{action}" if outcome is Outcome.DONE else outcome.value
        return page(_STATUS[outcome], claim.language, clinic=shown.clinic, when=when, message_key=message_key)
