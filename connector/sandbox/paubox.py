"""A local Paubox-compatible Email API with an inbox, for the demo, the tests and people trying mappings.

Same routes, auth check, validation, response and error shapes as the documented API
(../shared/docs/paubox-api.md sections 4-11). Nothing is ever delivered: accepted messages are kept in
memory and listed at `GET /_sandbox/messages` (what `connector sandbox inbox` shows).

Control endpoints (not part of Paubox):
    GET    /_sandbox/messages            accepted messages, decoded
    DELETE /_sandbox/messages            forget them
    POST   /_sandbox/faults              {"latency_ms": 0, "faults": [{"status": 500, "accept": true, "count": 1},
                                          {"hang": 30, "accept": true}, {"status": 429, "retry_after": 2},
                                          {"close": true, "accept": true}, {"status": 502, "html": true},
                                          {"status": 200}],   (200: an `errors` body)
                                          "webhooks": {"drop": 1, "duplicate": true, "reorder": true,
                                                       "delay": 0.5}}
    GET    /_sandbox/stats               counters per X-Notification-Key, first and last acceptance
The delay of a send request is `latency_ms` plus `latency_per_message_ms` (also a key of /_sandbox/faults)
per message it carries.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from connector.sandbox.paubox_faults import Chaos, Fault, WebhookFaults, apply_fault, errors

__all__ = ["Chaos", "Fault", "SandboxState", "WebhookFaults", "create_app", "validate_message", "webhook_event"]

NOT_FOUND_HTML = "<html><head><title>404 Not Found</title></head><body><h1>404 Not Found</h1></body></html>"
DEFAULT_RECIPIENT_DOMAINS = ("example.org", "example.com", "example.net")


@dataclass
class SandboxState:
    api_key: str
    username: str = "sandbox"
    from_domains: tuple[str, ...] = ("example.org",)
    recipient_domains: tuple[str, ...] = DEFAULT_RECIPIENT_DOMAINS
    webhook_url: str | None = None
    webhook_faults: WebhookFaults = field(default_factory=WebhookFaults)
    webhook_events: tuple[str, ...] = ("api_mail_log_delivered",)
    latency: float = 0.0  # seconds per send request
    latency_per_message: float = 0.0  # and seconds per message it carries (a bulk of 50 costs 50 of them)
    chaos: Chaos | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)  # accepted messages per X-Notification-Key
    received: int = 0  # send requests that arrived, answered or not
    bulk_requests: int = 0

    def next_fault(self) -> Fault | None:
        if not self.faults:
            return self.chaos.draw() if self.chaos else None
        fault = self.faults[0]
        fault.count -= 1
        if fault.count <= 0:
            self.faults.pop(0)
        return fault


def _domain(address: str) -> str:
    address = address.strip()
    if "<" in address and address.endswith(">"):
        address = address[address.rindex("<") + 1 : -1]
    return address.rpartition("@")[2].lower()


def _decode_html(value: str) -> str:
    """Strict padded base64 first (what our client sends), raw HTML otherwise (as Paubox allows)."""
    try:
        return base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return value


def validate_message(message: Any, state: SandboxState) -> str | None:
    """The 400 'details' for an invalid message, or None when it is acceptable."""
    if not isinstance(message, dict):
        return "data.message must be an object"
    recipients = message.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        return "Length of data.message.recipients should be at least 1"
    if len(recipients) > 100:
        return "A message may have at most 100 recipients"
    for recipient in [*recipients, *(message.get("cc") or []), *(message.get("bcc") or [])]:
        if not isinstance(recipient, str) or "@" not in recipient:
            return "Invalid recipient address"
        if _domain(recipient) not in state.recipient_domains:
            return "Recipient domain is not allowed in the sandbox (use example.org addresses)"
    headers = message.get("headers")
    if not isinstance(headers, dict):
        return "data.message.headers is required"
    if not headers.get("from"):
        return "Missing from"
    sender = _domain(str(headers["from"]))
    if not any(sender == d or sender.endswith("." + d) for d in state.from_domains):
        return "From domain is not verified"
    if not headers.get("subject"):
        return "Missing subject"
    content = message.get("content")
    if not isinstance(content, dict) or not (content.get("text/plain") or content.get("text/html")):
        return "No message body"
    for attachment in message.get("attachments") or []:
        try:
            base64.b64decode(str(attachment.get("content", "")), validate=False)
        except (binascii.Error, ValueError, AttributeError):
            return "Invalid base64 in attachment"
    return None


def _store(message: dict[str, Any], state: SandboxState) -> dict[str, Any]:
    headers = message["headers"]
    custom = {k: str(v) for k, v in headers.items() if k.lower().startswith("x-")}
    content = message["content"]
    stored = {
        "sourceTrackingId": str(uuid.uuid4()),
        "received_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "recipients": list(message["recipients"]),
        "cc": list(message.get("cc") or []),
        "bcc": list(message.get("bcc") or []),
        "from": headers.get("from"),
        "subject": headers.get("subject"),
        "headers": dict(headers),
        "custom_headers": custom,
        "text": content.get("text/plain"),
        "html": _decode_html(content["text/html"]) if content.get("text/html") else None,
        "html_wire": content.get("text/html"),
        "attachments": [
            {"fileName": a.get("fileName"), "contentType": a.get("contentType"), "content": a.get("content")}
            for a in message.get("attachments") or []
            if isinstance(a, dict)
        ],
        "delivery_status": "delivered",
        "message_id": f"<{uuid.uuid4()}@{_domain(str(headers.get('from')))}>",
    }
    state.messages.append(stored)
    state.requests[custom.get("X-Notification-Key", "")] += 1
    _emit_webhooks(stored, state)  # Paubox reports delivery whether or not the sender heard its answer
    return stored


def _authorised(request: Request, state: SandboxState) -> bool:
    header = request.headers.get("authorization", "")
    key = (
        header.removeprefix("Token token=")
        if header.startswith("Token token=")
        else header.removeprefix("Bearer ")
        if header.startswith("Bearer ")
        else None
    )
    username = request.path_params.get("username")
    return key == state.api_key and (username is None or username == state.username)


def _unauthorised() -> JSONResponse:
    return errors(
        401,
        "Invalid Access Token",
        "Access token is missing or does not match endpoint username",
        "invalid_access_token",
    )


def create_app(state: SandboxState) -> Starlette:
    async def send_message(request: Request) -> Response:
        state.received += 1
        raw = await request.body()  # read first: the request has fully arrived, whatever happens next
        if not _authorised(request, state):
            return _unauthorised()
        if state.latency or state.latency_per_message:
            await asyncio.sleep(state.latency + state.latency_per_message)
        try:
            body = json.loads(raw)
            message = body["data"]["message"]
        except (ValueError, KeyError, TypeError):
            return errors(400, "Bad Request", "Request body must be JSON with data.message")
        problem = validate_message(message, state)
        if problem:
            return errors(400, "Bad Request", problem)
        stored: list[dict[str, Any]] = []
        fault_response = await apply_fault(state.next_fault(), lambda: stored.append(_store(message, state)))
        if fault_response is not None:
            return fault_response
        saved = stored[0] if stored else _store(message, state)
        return JSONResponse(
            {
                "sourceTrackingId": saved["sourceTrackingId"],
                "customHeaders": saved["custom_headers"],
                "data": "Service OK",
            }
        )

    async def send_bulk(request: Request) -> Response:
        state.bulk_requests += 1
        raw = await request.body()
        if not _authorised(request, state):
            return _unauthorised()
        try:
            messages = json.loads(raw)["data"]["messages"]
            assert isinstance(messages, list) and messages
        except (ValueError, KeyError, TypeError, AssertionError):
            messages = None
        if state.latency or state.latency_per_message:
            await asyncio.sleep(state.latency + state.latency_per_message * len(messages or ()))
        if messages is None:
            return errors(400, "Bad Request", "Request body must be JSON with data.messages")
        for index, message in enumerate(messages):
            problem = validate_message(message, state)
            if problem:
                return errors(400, "Bad Request", f"messages[{index}]: {problem}")
        stored: list[dict[str, Any]] = []
        fault_response = await apply_fault(
            state.next_fault(), lambda: stored.extend(_store(m, state) for m in messages)
        )
        if fault_response is not None:
            return fault_response
        saved = stored or [_store(m, state) for m in messages]
        return JSONResponse(
            {
                "messages": [
                    {
                        "sourceTrackingId": s["sourceTrackingId"],
                        "customHeaders": s["custom_headers"],
                        "data": "Service OK",
                    }
                    for s in saved
                ]
            }
        )

    async def receipt(request: Request) -> Response:
        if not _authorised(request, state):
            return _unauthorised()
        tracking = request.query_params.get("sourceTrackingId", "")
        for message in state.messages:
            if message["sourceTrackingId"] == tracking:
                moment = format_datetime(datetime.fromisoformat(message["received_at"]))
                deliveries = [
                    {"recipient": r, "status": {"deliveryStatus": message["delivery_status"], "deliveryTime": moment}}
                    for r in message["recipients"]
                ]
                return JSONResponse(
                    {
                        "sourceTrackingId": tracking,
                        "data": {"message": {"id": message["message_id"], "message_deliveries": deliveries}},
                    }
                )
        return JSONResponse(
            {
                "errors": [
                    {
                        "code": 404,
                        "title": "Message was not found",
                        "details": "Message with this tracking id was not found",
                    }
                ],
                "sourceTrackingId": tracking,
            },
            status_code=404,
        )

    async def list_messages(request: Request) -> Response:
        if request.method == "DELETE":
            state.messages.clear()
            state.requests.clear()
            return JSONResponse({"deleted": True})
        shown = [{k: v for k, v in m.items() if k != "html_wire"} for m in state.messages]
        return JSONResponse({"messages": shown})

    async def faults(request: Request) -> Response:
        body = json.loads(await request.body() or b"{}")
        state.latency = float(body.get("latency_ms", state.latency * 1000)) / 1000
        state.latency_per_message = float(body.get("latency_per_message_ms", state.latency_per_message * 1000)) / 1000
        state.faults = [Fault(**f) for f in body.get("faults", [])]
        state.webhook_faults = WebhookFaults(**body.get("webhooks", {}))
        return JSONResponse({"latency_ms": state.latency * 1000, "faults": len(state.faults)})

    async def stats(request: Request) -> Response:
        return JSONResponse(
            {
                "received": state.received,
                "accepted": len(state.messages),
                "bulk_requests": state.bulk_requests,
                "first_received_at": state.messages[0]["received_at"] if state.messages else None,
                "last_received_at": state.messages[-1]["received_at"] if state.messages else None,
                "per_key": dict(state.requests),
                "tracking": {
                    m["custom_headers"].get("X-Notification-Key", ""): m["sourceTrackingId"] for m in state.messages
                },
            }
        )

    async def not_found(request: Request) -> Response:
        return HTMLResponse(NOT_FOUND_HTML, status_code=404)

    routes = [
        Route("/_sandbox/messages", list_messages, methods=["GET", "DELETE"]),
        Route("/_sandbox/faults", faults, methods=["POST"]),
        Route("/_sandbox/stats", stats, methods=["GET"]),
    ]
    for prefix in ("/v1/email", "/v1/{username}", "/v1"):
        routes += [
            Route(f"{prefix}/messages", send_message, methods=["POST"]),
            Route(f"{prefix}/bulk_messages", send_bulk, methods=["POST"]),
            Route(f"{prefix}/message_receipt", receipt, methods=["GET"]),
        ]
    routes.append(Route("/{path:path}", not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]))
    return Starlette(routes=routes)


def webhook_event(message: dict[str, Any], recipient: str, event_name: str) -> dict[str, Any]:
    """A Paubox-shaped webhook event (../shared/docs/paubox-api.md section 9.2)."""
    return {
        "event_name": event_name,
        "payload": {
            "id": abs(hash((message["sourceTrackingId"], recipient, event_name))) % 10**10,
            "subject": message["subject"],
            "header_message_id": message["message_id"],
            "source_tracking_id": message["sourceTrackingId"],
            "outbound_queue_id": uuid.uuid4().hex[:15],
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "from": message["from"],
            "to": recipient,
            "custom_headers": message["custom_headers"],
        },
    }


def _emit_webhooks(message: dict[str, Any], state: SandboxState) -> None:
    """Webhooks for an accepted message, one per recipient and event, sent once and not retried, with the
    configured faults (dropped, duplicated, reordered, delayed)."""
    if not state.webhook_url:
        return
    url, faults = state.webhook_url, state.webhook_faults
    events = [webhook_event(message, r, name) for r in message["recipients"] for name in state.webhook_events]
    if faults.reorder:
        events.reverse()
    if faults.duplicate:
        events = [e for event in events for e in (event, event)]
    kept = []
    for event in events:
        if faults.drop > 0:
            faults.drop -= 1
            continue
        if state.chaos is not None and state.chaos.drops_webhook():
            continue
        kept.append(event)

    async def post_all() -> None:
        if faults.delay:
            await asyncio.sleep(faults.delay)
        async with httpx.AsyncClient(timeout=5) as client:
            for event in kept:
                with contextlib.suppress(httpx.HTTPError):  # Paubox does not retry webhooks either
                    await client.post(url, json=event)

    task = asyncio.get_running_loop().create_task(post_all())
    _PENDING_WEBHOOKS.add(task)
    task.add_done_callback(_PENDING_WEBHOOKS.discard)


_PENDING_WEBHOOKS: set[asyncio.Task[None]] = set()
