"""The Paubox Email API over httpx: `POST {base}/messages`, one message per request.

Facts behind the classification (../shared/docs/paubox-api.md, section 11.3): Paubox has no idempotency
key, so anything that may have reached it and gave no clear answer is in doubt, never retried.
Nothing here logs or returns a body, an address or the notification key.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import httpx

from connector.delivery import Outcome, Signal, Verdict
from connector.delivery.pool import ClientPool
from connector.errors import ConnectorError

if TYPE_CHECKING:
    from connector.config.delivery import PauboxConfig
    from connector.models import Email

NOTIFICATION_HEADER = "X-Notification-Key"
_ADDRESS = re.compile(r"[^\s@<>\"',;:]+@[^\s@<>\"',;:]+")


def build_payload(email: Email) -> dict[str, Any]:
    """The JSON body of `POST /messages`. HTML goes base64-encoded (UTF-8), which removes the doubt a
    server has about raw HTML that happens to look like base64."""
    headers: dict[str, str] = {"subject": email.subject, "from": email.from_address}
    if email.reply_to:
        headers["reply-to"] = email.reply_to
    headers.update(email.headers)
    headers[NOTIFICATION_HEADER] = email.notification_key
    content: dict[str, str] = {"text/plain": email.text}
    if email.html:
        content["text/html"] = base64.b64encode(email.html.encode("utf-8")).decode("ascii")
    message: dict[str, Any] = {"recipients": [email.to], "headers": headers, "content": content}
    if email.attachments:
        message["attachments"] = [
            {"fileName": a.filename, "contentType": a.content_type, "content": base64.b64encode(a.content).decode()}
            for a in email.attachments
        ]
    return {"data": {"message": message}}


def encode(body: dict[str, Any]) -> bytes:
    """The JSON bytes of a request body. Raises ValueError (UnicodeEncodeError for a lone surrogate, a
    number JSON cannot carry) before anything is sent: the message, not Paubox, is at fault."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def unencodable(exc: Exception) -> Outcome:
    return Outcome(Verdict.FAILED, f"not sent: the message cannot be encoded as JSON ({type(exc).__name__})")


def error_title(body: bytes) -> str:
    """A short description from any of Paubox's error shapes, with anything like an address removed."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "non-JSON body"
    text = ""
    if isinstance(data, dict):
        errors = data.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            text = ": ".join(
                str(errors[0][k]) for k in ("title", "details") if isinstance(errors[0].get(k), str) and errors[0][k]
            )
        elif isinstance(data.get("title"), str):
            details = data.get("details")
            inner = details.get("details") if isinstance(details, dict) else details
            text = data["title"] + (f": {inner}" if isinstance(inner, str) else "")
        elif isinstance(data.get("error"), str):
            text = data["error"]
        elif isinstance(data.get("message"), str):
            text = data["message"]
    return _ADDRESS.sub("<address>", text)[:200] or "no error description"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            from datetime import UTC, datetime

            return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
        except (TypeError, ValueError):
            return None


ServerErrors = Literal["in_doubt", "retry"]


def accepted(data: Any, body: bytes) -> Outcome:
    """One message's part of a 200 answer: accepted with a tracking id, refused, or unclear."""
    tracking = data.get("sourceTrackingId") if isinstance(data, dict) else None
    errors = data.get("errors") if isinstance(data, dict) else None
    if isinstance(tracking, str) and tracking and not errors:
        return Outcome(Verdict.SENT, "accepted", tracking_id=tracking)
    if errors and not tracking:
        return Outcome(Verdict.FAILED, f"HTTP 200 carrying errors: {error_title(body)}")
    return Outcome(Verdict.IN_DOUBT, "HTTP 200 without a sourceTrackingId")


def classify(status: int, body: bytes, headers: Mapping[str, str], server_errors: ServerErrors = "in_doubt") -> Outcome:
    """Decide what an HTTP answer to `POST /messages` means for the notification."""
    if status == 200:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return Outcome(Verdict.IN_DOUBT, "HTTP 200 with a non-JSON body")
        return accepted(data, body)
    title = error_title(body)
    if status == 429:
        return Outcome(
            Verdict.RETRY,
            f"HTTP 429 rate limited: {title}",
            retry_after=_retry_after(headers),
            signal=Signal.RATE_LIMITED,
        )
    if status == 408:  # the server gave up reading the request: it was not processed
        return Outcome(Verdict.RETRY, "HTTP 408 request timeout", retry_after=_retry_after(headers))
    if 300 <= status < 400:
        return Outcome(Verdict.RETRY, f"HTTP {status} redirect: check delivery.paubox.base_url", blocking=True)
    if status in (401, 403):
        return Outcome(
            Verdict.RETRY, f"HTTP {status} {title}: check delivery.paubox.api_key and username", blocking=True
        )
    if status == 404:
        return Outcome(Verdict.RETRY, f"HTTP 404 {title}: check delivery.paubox.base_url / username", blocking=True)
    if 400 <= status < 500:
        return Outcome(Verdict.FAILED, f"HTTP {status} {title}")
    if status >= 500 and server_errors == "retry":
        return Outcome(
            Verdict.RETRY, f"HTTP {status} {title}", retry_after=_retry_after(headers), signal=Signal.SERVER_ERROR
        )
    return Outcome(
        Verdict.IN_DOUBT,
        f"HTTP {status} {title}: Paubox may have accepted the message",
        signal=Signal.SERVER_ERROR if status >= 500 else Signal.OK,
    )


def classify_exception(exc: httpx.HTTPError) -> Outcome:
    """Failures before the request left are safe to retry; after it left, the outcome is unknown."""
    kind = type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return Outcome(Verdict.RETRY, f"not sent: {kind}", signal=Signal.SERVER_ERROR)
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return Outcome(Verdict.RETRY, f"not sent: {kind}, check delivery.paubox.base_url", blocking=True)
    return Outcome(Verdict.IN_DOUBT, f"no answer after sending: {kind}", signal=Signal.SERVER_ERROR)


class PauboxRestMailer:
    """Sends with `POST {base}/messages`. `transport` lets tests put any httpx transport underneath."""

    def __init__(
        self, config: PauboxConfig, *, concurrency: int = 4, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._server_errors: ServerErrors = config.server_errors
        key = config.api_key.get_secret_value()
        authorization = f"Bearer {key}" if config.auth_scheme == "bearer" else f"Token token={key}"
        timeout = httpx.Timeout(
            connect=config.connect_timeout.total_seconds(),
            read=config.read_timeout.total_seconds(),
            write=config.read_timeout.total_seconds(),
            pool=60.0,
        )
        headers = {"Authorization": authorization, "Accept": "application/json"}

        def make(tls: ssl.SSLContext | None) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=config.endpoint + "/",
                timeout=timeout,
                transport=transport,
                verify=tls if tls is not None else True,
                follow_redirects=False,
                headers=headers,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            )

        # One connection per client, up to `concurrency` clients (connector.delivery.pool says why); a
        # transport given by a test is shared by a single client, as it was.
        self._pool = ClientPool(make, concurrency if transport is None else 1)

    def _request(self, client: httpx.AsyncClient, path: str, content: bytes) -> httpx.Request | Outcome:
        """The request, or why it could not be built (nothing has left: never in doubt)."""
        try:
            return client.build_request("POST", path, content=content, headers={"Content-Type": "application/json"})
        except Exception as exc:  # noqa: BLE001 - nothing was sent, whatever broke
            return Outcome(
                Verdict.RETRY,
                f"not sent: the request could not be built ({type(exc).__name__}); check delivery.paubox",
                blocking=True,
            )

    async def _post(self, path: str, content: bytes) -> httpx.Response | Outcome:
        """Send a request. Failures before it is built are retried or failed; only what happens once it may
        have left can be in doubt."""
        try:
            async with self._pool.client() as client:
                return await self._exchange(client, path, content)
        except Exception as exc:  # noqa: BLE001 - only making a client gets here (_exchange answers the rest): nothing sent
            return Outcome(
                Verdict.RETRY,
                f"not sent: the HTTP client could not be made ({type(exc).__name__}); check delivery.paubox",
                blocking=True,
            )

    async def _exchange(self, client: httpx.AsyncClient, path: str, content: bytes) -> httpx.Response | Outcome:
        request = self._request(client, path, content)
        if isinstance(request, Outcome):
            return request
        try:
            return await client.send(request)
        except httpx.HTTPError as exc:
            return classify_exception(exc)
        except Exception as exc:  # noqa: BLE001 - whatever broke, the request may have left: never resend blindly
            return Outcome(
                Verdict.IN_DOUBT, f"unexpected {type(exc).__name__} while sending", signal=Signal.SERVER_ERROR
            )

    async def send(self, email: Email) -> Outcome:
        try:
            content = encode(build_payload(email))
        except ValueError as exc:
            return unencodable(exc)
        response = await self._post("messages", content)
        if isinstance(response, Outcome):
            return response
        return classify(response.status_code, response.content, response.headers, self._server_errors)

    async def send_many(self, emails: list[Email]) -> list[Outcome]:
        """`POST {base}/bulk_messages`: tracking ids come back in request order. Any answer that does not
        account for every message (lost, 5xx, wrong length) leaves every one of them in doubt. A message that
        cannot be encoded fails alone; the others go without it."""
        messages: list[Any] = []
        for email in emails:
            try:
                message = build_payload(email)["data"]["message"]
                encode(message)
                messages.append(message)
            except ValueError as exc:
                messages.append(unencodable(exc))
        sendable = [(e, m) for e, m in zip(emails, messages, strict=True) if not isinstance(m, Outcome)]
        outcomes = iter(await self._send_bulk([e for e, _ in sendable], [m for _, m in sendable]))
        return [m if isinstance(m, Outcome) else next(outcomes) for m in messages]

    async def _send_bulk(self, emails: list[Email], messages: list[dict[str, Any]]) -> list[Outcome]:
        if not emails:
            return []
        response = await self._post("bulk_messages", encode({"data": {"messages": messages}}))
        if isinstance(response, Outcome):
            return [response] * len(emails)
        if response.status_code in (400, 413, 422) and len(emails) > 1:
            # Refused as a whole (nothing was accepted) and Paubox does not say which item: one by one.
            return [await self.send(email) for email in emails]
        if response.status_code != 200:
            return [classify(response.status_code, response.content, response.headers, self._server_errors)] * len(
                emails
            )
        try:
            items = json.loads(response.content).get("messages")
        except (ValueError, UnicodeDecodeError, AttributeError):
            items = None
        if not isinstance(items, list) or len(items) != len(emails):
            return [
                Outcome(Verdict.IN_DOUBT, "bulk answer does not account for every message", signal=Signal.SERVER_ERROR)
            ] * len(emails)
        return [accepted(item, response.content) for item in items]

    async def receipt(self, tracking_id: str) -> Any:
        """`GET {base}/message_receipt?sourceTrackingId=`: the JSON answer, None when Paubox has no such
        message (yet). Raises ConnectorError when Paubox cannot be asked now."""
        try:
            async with self._pool.client() as client:
                response = await client.get("message_receipt", params={"sourceTrackingId": tracking_id})
        except httpx.HTTPError as exc:
            raise ConnectorError(f"message_receipt failed: {type(exc).__name__}") from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ConnectorError(f"message_receipt answered HTTP {response.status_code}")
        try:
            return json.loads(response.content)
        except ValueError:
            raise ConnectorError("message_receipt answered with a non-JSON body") from None

    async def lookup(self, tracking_id: str) -> tuple[int, bool]:
        """`GET message_receipt` for `tracking_id`: the HTTP status and whether the body is JSON. `connector
        check` asks for an id that cannot exist to learn whether the key is accepted. Raises httpx.HTTPError."""
        async with self._pool.client() as client:
            response = await client.get("message_receipt", params={"sourceTrackingId": tracking_id})
        try:
            json.loads(response.content)
        except ValueError:
            return response.status_code, False
        return response.status_code, True

    async def aclose(self) -> None:
        await self._pool.aclose()
