"""After a send: Paubox webhooks, receipts, and what happens to notifications left in doubt.

- A webhook naming a notification's `X-Notification-Key` proves Paubox had the message: an `in_doubt`
  one becomes `sent` (with the `source_tracking_id`), and every event updates the delivery status.
- Sent notifications with no delivery status after `dispatch.receipts_after` are asked about with
  `GET message_receipt`.
- An `in_doubt` notification nobody confirmed after `dispatch.in_doubt.wait`: policy `hold` reports it
  once (log + metric) and leaves it for a person (`connector resolve`); policy `resend` sends it once more
  under the same key (at-least-once), and holds it if that one ends in doubt too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import structlog

from connector import jsontext, metrics, optout
from connector.delivery.paubox import NOTIFICATION_HEADER
from connector.delivery.status import WEBHOOK_EVENTS, from_receipt
from connector.errors import ConnectorError
from connector.fhir import parse_instant
from connector.models import Clock, State

if TYPE_CHECKING:
    from connector.config import Config
    from connector.ledger.abc import AfterSend, Bounces, OptOuts
    from connector.optout import OptOutKeys

log = structlog.get_logger("connector.aftercare")


@runtime_checkable
class ReceiptReader(Protocol):
    async def receipt(self, tracking_id: str) -> Any: ...


@dataclass(frozen=True)
class WebhookResult:
    outcome: str  # "confirmed", "updated", "unchanged", "ignored"


def _notification_key(payload: dict[str, Any]) -> str | None:
    headers = payload.get("custom_headers")
    if not isinstance(headers, dict):
        return None
    for name, value in headers.items():
        if isinstance(name, str) and name.lower() == NOTIFICATION_HEADER.lower() and isinstance(value, str):
            return _ours(value)
    return None


def _ours(value: Any) -> str | None:
    """A key or tracking id that could be one of ours: printable text of a sane length. Anything else (NUL,
    which PostgreSQL refuses; control characters) names no notification, so the event is not about us."""
    return value if isinstance(value, str) and 0 < len(value) <= 512 and jsontext.storable(value) else None


def _when(value: Any, fallback: datetime) -> datetime:
    """The event's time, if it is one the ledger can store in UTC (not year 1 at +14:00 or 9999 at -14:00)."""
    found = parse_instant(value)
    try:
        return found.astimezone(UTC) if found is not None else fallback
    except OverflowError:
        return fallback


class Aftercare:
    def __init__(
        self,
        config: Config,
        after_send: AfterSend,
        optouts: OptOuts,
        clock: Clock,
        bounces: Bounces | None = None,
        keys: OptOutKeys | None = None,
    ) -> None:
        self.config = config
        self.after_send = after_send
        self.optouts = optouts
        self.clock = clock
        # Bounces suppress an address per patient (connector.bounces) when configured and keyed.
        self.bounces = bounces if config.bounces.suppress and keys is not None else None
        self.keys = keys

    async def webhook(self, event: Any) -> WebhookResult:
        """Apply one Paubox webhook event. Unknown events and other systems' messages are ignored."""
        name = event.get("event_name") if isinstance(event, dict) else None
        payload = event.get("payload") if isinstance(event, dict) else None
        if not isinstance(name, str) or not isinstance(payload, dict):
            raise ConnectorError("not a Paubox webhook event (event_name and payload expected)")
        if name not in WEBHOOK_EVENTS:
            log.info(
                "webhook.ignored",
                event_name=name[:64] if jsontext.storable(name) else "(unprintable)",
                problem="unknown event name",
            )
            metrics.inc("connector_webhook_events_total", event="unknown", result="ignored")
            return WebhookResult("ignored")
        key = _notification_key(payload)
        tracking = _ours(payload.get("source_tracking_id"))
        if key is None and tracking is None:
            metrics.inc("connector_webhook_events_total", event=name, result="ignored")
            return WebhookResult("ignored")
        status, rank = WEBHOOK_EVENTS[name]
        when = _when(payload.get("time"), self.clock())
        confirmed = key is not None and await self.after_send.confirm(
            key, tracking, f"confirmed by a Paubox webhook ({name})"
        )
        updated = await self.after_send.record_delivery(key, tracking, status, rank, when)
        suppressed = False
        # A soft bounce counts once per message: a repeat of its webhook (Paubox retries one it thinks was
        # lost) leaves the delivery status as it was, and must not count towards the limit again.
        if key is not None and (status == "hard_bounced" or (status == "soft_bounced" and updated)):
            suppressed = await self._suppress(key, payload.get("to"), hard=status == "hard_bounced", when=when)
        # One bounce, one record: where it was kept per patient (`bounces:`), which heals when the EHR has
        # another address, it does not also go on the opt-out list for every patient, for good.
        if status == "hard_bounced" and self.config.delivery.paubox.optout_on_hard_bounce and not suppressed:
            address = payload.get("to")
            if isinstance(address, str) and "@" in address and jsontext.storable(address) and len(address) <= 320:
                await self.optouts.add(
                    "email",
                    optout.digest("email", address),
                    optout.hint("email", address),
                    "hard bounce reported by Paubox",
                    origin="bounce",
                )
        result = "confirmed" if confirmed else ("updated" if updated else "unchanged")
        if confirmed:
            log.info("notification.confirmed", event_name=name, problem="in_doubt resolved: Paubox had the message")
        metrics.inc("connector_webhook_events_total", event=name, result=result)
        return WebhookResult(result)

    async def _suppress(self, key: str, address: Any, *, hard: bool, when: datetime) -> bool:
        """Count a bounce against the patient's address (never logged: only that it was suppressed). True when
        it was counted for a patient of ours (the bounces role keeps it), False when it could not be."""
        if self.bounces is None or self.keys is None:
            return False
        if not (isinstance(address, str) and "@" in address and jsontext.storable(address) and len(address) <= 320):
            return False
        settings = self.config.bounces
        tally = await self.bounces.bounced(
            key,
            self.keys.keyed(optout.digest("email", address)),
            self.keys.current,
            optout.hint("email", address),
            hard=hard,
            now=when,
            soft_limit=settings.soft_limit,
            soft_window=settings.soft_window,
        )
        if tally is not None and tally.suppressed and tally.suppressed_at == when:
            log.warning("address.suppressed", reason=tally.reason, problem="a patient's address bounced")
        return tally is not None

    async def settle_doubts(self) -> int:
        """Apply the in-doubt policy to notifications nobody confirmed in time. Returns how many."""
        settings = self.config.dispatch.in_doubt
        now = self.clock()
        overdue = await self.after_send.overdue_in_doubt(now - settings.wait, 500)
        held = []
        for n in overdue:
            if settings.policy == "resend" and n.resends == 0:
                if await self.after_send.resend(
                    n.id,
                    now,
                    f"resent: no confirmation after {settings.wait}",
                    [State.IN_DOUBT],
                    True,
                ):
                    log.warning(
                        "notification.resent",
                        notification=n.id,
                        mapping=n.mapping,
                        problem="in doubt without confirmation; sent again under the same key",
                    )
                continue
            held.append(n.id)
        if held:
            await self.after_send.mark_alerted(held)
            metrics.inc("connector_in_doubt_alerts_total", len(held))
            log.error(
                "notification.in_doubt_unresolved",
                count=len(held),
                notifications=held[:20],
                problem="no Paubox confirmation; check the recipients' mail or Paubox, then "
                "`connector resolve KEY --sent|--resend|--cancel`",
            )
        return len(overdue)

    async def check_receipts(self, reader: ReceiptReader, limit: int = 50) -> int:
        """Ask Paubox about sent notifications no webhook reported on. Returns how many were updated."""
        now = self.clock()
        waiting = await self.after_send.awaiting_receipt(now - self.config.dispatch.receipts_after, limit)
        updated = 0
        for n in waiting:
            assert n.tracking_id is not None
            try:
                found = from_receipt(await reader.receipt(n.tracking_id))
            except ConnectorError as exc:
                log.warning("receipt.failed", notification=n.id, problem=str(exc))
                break
            if found is not None:
                status, rank = found
                updated += await self.after_send.record_delivery(n.key, None, status, rank, now, "receipt")
        return updated
