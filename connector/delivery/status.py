"""Pure: what Paubox webhooks and receipts say about delivery, as (status, rank).

A higher rank wins, so repeated and out-of-order events never step a status back:
soft_bounced 1 < hard_bounced 2 < delivered 3 < opened 4.
"""

from __future__ import annotations

from typing import Any

WEBHOOK_EVENTS: dict[str, tuple[str, int]] = {
    "api_mail_log_temporary_failure": ("soft_bounced", 1),
    "api_mail_log_permanent_failure": ("hard_bounced", 2),
    "api_mail_log_delivered": ("delivered", 3),
    "api_mail_log_opened": ("opened", 4),
}

_RECEIPT: dict[str, tuple[str, int]] = {
    "soft bounced": ("soft_bounced", 1),
    "soft bounced - mailbox full": ("soft_bounced", 1),
    "hard bounced": ("hard_bounced", 2),
    "delivered": ("delivered", 3),
    "delivered via secure portal": ("delivered", 3),
}


def from_receipt(body: Any) -> tuple[str, int] | None:
    """The strongest status in a `message_receipt` answer; None while Paubox is still working on it."""
    message = ((body or {}).get("data") or {}).get("message") if isinstance(body, dict) else None
    deliveries = message.get("message_deliveries") if isinstance(message, dict) else None
    best: tuple[str, int] | None = None
    for delivery in deliveries if isinstance(deliveries, list) else []:
        status = (delivery or {}).get("status") if isinstance(delivery, dict) else None
        if not isinstance(status, dict):
            continue
        found = _RECEIPT.get(str(status.get("deliveryStatus") or "").strip())
        if status.get("openedStatus") == "opened":
            found = ("opened", 4)
        if found and (best is None or found[1] > best[1]):
            best = found
    return best
