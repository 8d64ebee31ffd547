"""Delivery: a Mailer takes an Email and returns an Outcome. Outcomes are values, not exceptions.

    sent       Paubox accepted it (200 with a sourceTrackingId).
    retry      certainly not accepted (connection refused, 429, ...): safe to send again later.
    failed     refused for good (400/422, ...): sending it again unchanged would fail again.
    in_doubt   the request may have been accepted (timeout after sending, 5xx, 200 without an id):
               never resent automatically.

`blocking` marks a retry caused by configuration (wrong key, wrong base URL): the notification is not at
fault, the dispatcher pauses the mailer instead of spending the notification's attempts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from connector.models import Email


class Signal(StrEnum):
    """What an answer says about Paubox itself (for the mailer gate), apart from this notification."""

    OK = "ok"  # Paubox is up (whatever it thought of this message)
    RATE_LIMITED = "rate_limited"  # 429: everybody waits
    SERVER_ERROR = "server_error"  # 5xx, refused or timed-out connections: counts towards the circuit breaker


class Verdict(StrEnum):
    SENT = "sent"
    RETRY = "retry"
    FAILED = "failed"
    IN_DOUBT = "in_doubt"


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    reason: str  # PHI-free: HTTP status, Paubox error title, exception type
    tracking_id: str | None = None
    retry_after: float | None = None  # seconds, from Retry-After
    blocking: bool = False
    signal: Signal = Signal.OK


class Mailer(Protocol):
    async def send(self, email: Email) -> Outcome: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class BulkMailer(Mailer, Protocol):
    async def send_many(self, emails: list[Email]) -> list[Outcome]:
        """Several messages in one request (Paubox bulk_messages); one outcome per email, in order.
        A lost answer leaves every one of them in doubt."""
        ...
