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
from typing import Protocol

from connector.models import Email


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


class Mailer(Protocol):
    async def send(self, email: Email) -> Outcome: ...

    async def aclose(self) -> None: ...
