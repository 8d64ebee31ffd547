"""Pure: what a FHIR Subscription notification says.

R4 classic rest-hook: an empty POST ("something changed") or a PUT of the resource. Subscriptions R5
Backport: a `history` Bundle whose first entry is the status (an R4 `Parameters` resource, or an R4B
`SubscriptionStatus`) with the notification type, the subscription, `events-since-subscription-start`
and the events' focus references; `full-resource` notifications carry the resources too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from connector import jsontext
from connector.errors import ResourceError
from connector.fhir import reference_id

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # FHIR R4 `id`


@dataclass(frozen=True)
class Notification:
    kind: str  # handshake | heartbeat | event-notification | query-status | query-event
    subscription: str
    status: str | None
    events_since: int | None
    event_numbers: list[int] = field(default_factory=list)
    focus_ids: list[str] = field(default_factory=list)  # Appointment ids
    resources: list[dict[str, Any]] = field(default_factory=list)  # full-resource content


def _value(parameter: dict[str, Any]) -> Any:
    for key, value in parameter.items():
        if key.startswith("value"):
            return value
    return None


def _number(value: Any) -> int | None:
    """A counter from a string or number; None when it is not a sane non-negative 63-bit number."""
    try:
        number = int(str(value)[:20])
    except (TypeError, ValueError):
        return None
    return number if 0 <= number < 2**63 else None


def _reference(value: Any) -> str:
    return str(value.get("reference") or "")[:300] if isinstance(value, dict) else ""


def parse_bundle(bundle: Any, base_url: str) -> Notification:
    """Read a Backport notification Bundle. Raises ResourceError (PHI-free) when it is not one."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ResourceError("not a FHIR Bundle")
    listed = bundle.get("entry")
    entries = [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
    status = entries[0].get("resource") if entries else None
    if not isinstance(status, dict) or status.get("resourceType") not in ("Parameters", "SubscriptionStatus"):
        raise ResourceError("the first entry is not a subscription status (Parameters or SubscriptionStatus)")
    read = _from_parameters if status["resourceType"] == "Parameters" else _from_subscription_status
    fields = read(status)
    if not all(jsontext.storable(text) for text in (fields["subscription"], fields["status"] or "")):
        raise ResourceError("the subscription reference or status holds control characters")
    focus_ids: list[str] = []
    for reference in fields.pop("focus"):
        found = reference_id(reference, "Appointment", base_url) or reference_id(reference, "Appointment")
        if (found is None and "Appointment/" in reference) or (found and not _FHIR_ID.fullmatch(found)):
            raise ResourceError("a focus reference does not end in a FHIR id ([A-Za-z0-9-.], at most 64)")
        if found and found not in focus_ids:
            focus_ids.append(found)
    resources = [
        e["resource"]
        for e in entries[1:]
        if isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") == "Appointment"
    ]
    if not fields["kind"]:
        raise ResourceError("the subscription status names no notification type")
    return Notification(focus_ids=focus_ids, resources=resources, **fields)


def _from_parameters(status: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {
        "kind": "",
        "subscription": "",
        "status": None,
        "events_since": None,
        "event_numbers": [],
        "focus": [],
    }
    listed = status.get("parameter")
    for parameter in listed if isinstance(listed, list) else []:
        if not isinstance(parameter, dict):
            continue
        name, value = parameter.get("name"), _value(parameter)
        if name == "type":
            found["kind"] = str(value or "")[:32]
        elif name == "subscription":
            found["subscription"] = _reference(value)
        elif name == "status":
            found["status"] = value[:32] if isinstance(value, str) and value else None
        elif name == "events-since-subscription-start":
            found["events_since"] = _number(value)
        elif name == "notification-event":
            parts = parameter.get("part")
            for part in parts if isinstance(parts, list) else []:
                if not isinstance(part, dict):
                    continue
                if part.get("name") == "event-number" and _number(_value(part)) is not None:
                    found["event_numbers"].append(_number(_value(part)))
                if part.get("name") == "focus":
                    found["focus"].append(_reference(_value(part)))
    return found


def _from_subscription_status(status: dict[str, Any]) -> dict[str, Any]:
    listed = status.get("notificationEvent")
    events = [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
    state = status.get("status")
    return {
        "kind": str(status.get("type") or "")[:32],
        "subscription": _reference(status.get("subscription")),
        "status": state[:32] if isinstance(state, str) else None,
        "events_since": _number(status.get("eventsSinceSubscriptionStart")),
        "event_numbers": [n for n in (_number(e.get("eventNumber")) for e in events) if n is not None],
        "focus": [_reference(e.get("focus")) for e in events],
    }


def gap(known: int | None, notification: Notification) -> bool:
    """Did events go missing before this notification? (The counter does not count handshakes and
    heartbeats; a first notification of a subscription we never heard of is no gap.)"""
    if known is None or notification.events_since is None:
        return False
    carried = len(notification.event_numbers) if notification.kind == "event-notification" else 0
    return notification.events_since - carried > known
