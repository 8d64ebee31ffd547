"""Pure: what a stored CRM event says about an appointment, read with its source's declaration
(`crm.<name>.appointment`, connector.config.crm_appointments), and the email such an appointment calls for.

`describe` turns an event into the values the lifecycle core works with (connector.lifecycle): a `Snapshot`
(status, start, end, the contact as the one "patient", the event's time as its last update, and the inbox
row as its version, so that the sender can open the event again) and a `view`, the plain JSON that mapping
conditions, keys and templates see as `appointment`. Errors never quote the event (it holds patient data).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from connector.addresses import usable
from connector.config.crm_appointments import Status
from connector.errors import ResourceError
from connector.lifecycle import Snapshot
from connector.mapping.engine import render_with

if TYPE_CHECKING:
    from connector.config.crm_appointments import CrmAppointmentConfig
    from connector.mapping.loader import Mapping
    from connector.models import Email

CONTACT = "contact"  # the one "patient" of an appointment whose source names no contact id
_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@functools.lru_cache(maxsize=256)
def _compiled(expression: str) -> Callable[..., list[Any]]:
    import fhirpathpy  # here: only CRM appointment declarations need it (start-up stays lean)

    compiled: Callable[..., list[Any]] = fhirpathpy.compile(expression)
    return compiled


def read_path(expression: str | None, document: dict[str, Any]) -> list[Any]:
    """Every value `expression` finds in `document` (none for no expression). Raises ResourceError."""
    if expression is None:
        return []
    try:
        return [v for v in _compiled(expression)(document) if v is not None]
    except Exception as exc:  # noqa: BLE001 - fhirpathpy raises bare Exception
        raise ResourceError(f"a path of the appointment declaration failed ({type(exc).__name__})") from None


def _first(expression: str | None, document: dict[str, Any]) -> Any:
    found = read_path(expression, document)
    return found[0] if found else None


def _scalar(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    text = str(value).strip()
    return text or None


def instant(value: Any, zone: str) -> datetime | None:
    """An ISO 8601 time (without an offset: local to `zone`) or epoch milliseconds → aware UTC; None when
    absent. Raises ResourceError for anything else."""
    text = _scalar(value)
    if text is None:
        return None
    try:
        if text.isdigit():
            return _EPOCH + timedelta(milliseconds=int(text))
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=ZoneInfo(zone))
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ResourceError("a time in the event is neither ISO 8601 nor epoch milliseconds") from None


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _zone(settings: CrmAppointmentConfig, event: dict[str, Any], default: str) -> str:
    found = _scalar(_first(settings.timezone, event))
    if found is None:
        return default
    try:
        ZoneInfo(found)
    except (ZoneInfoNotFoundError, ValueError):
        raise ResourceError("the timezone path gave no known IANA zone name") from None
    return found


def describes_appointment(settings: CrmAppointmentConfig, event: dict[str, Any]) -> bool:
    """Is this event one the declaration reads as an appointment (its type listed, its condition true)?"""
    if str(event.get("event_type") or "") not in settings.events:
        return False
    return settings.condition is None or read_path(settings.condition, event) == [True]


def _status(settings: CrmAppointmentConfig, event: dict[str, Any]) -> str:
    rule = settings.status
    found = _scalar(_first(rule.path, event))
    if found is None:
        if rule.default is None:
            raise ResourceError("the status path found nothing and status.default is not set")
        return rule.default
    if found in rule.map:
        return rule.map[found]
    if not rule.map and found in get_args(Status):
        return found
    raise ResourceError("the status found in the event is not one of status.map")


@dataclass(frozen=True)
class Described:
    """One event's account of an appointment."""

    appointment_id: str
    snapshot: Snapshot
    view: dict[str, Any]  # what mappings see as `appointment`
    zone: str


@dataclass(frozen=True)
class Deleted:
    """The event is about an appointment whose CRM object no longer exists (`fetch_object` found none)."""

    appointment_id: str


def appointment_id_of(settings: CrmAppointmentConfig, event: dict[str, Any]) -> str:
    found = _scalar(_first(settings.id, event))
    if found is None or not _ID.fullmatch(found):
        raise ResourceError("the id path gave no appointment id (letters, digits, - . _ :, at most 128)")
    return found


def object_gone(settings: CrmAppointmentConfig, event: dict[str, Any]) -> bool:
    """Did `fetch_object` find the CRM object gone?"""
    return settings.fetch_object and event.get("object") is None


def describe(settings: CrmAppointmentConfig, event: dict[str, Any], version: str, default_zone: str) -> Described:
    """The appointment an event describes; `version` names the inbox row. Raises ResourceError."""
    if object_gone(settings, event):
        raise ResourceError("the CRM object no longer exists")
    appointment_id = appointment_id_of(settings, event)
    contact = _scalar(_first(settings.contact, event)) if settings.contact else CONTACT
    if contact is None or not _ID.fullmatch(contact):
        raise ResourceError("the contact path gave no contact id (letters, digits, - . _ :, at most 128)")
    zone = _zone(settings, event, default_zone)
    start = instant(_first(settings.start, event), zone)
    end = instant(_first(settings.end, event), zone)
    status = _status(settings, event)
    occurred = instant(_first(settings.occurred_at, event) if settings.occurred_at else event.get("occurred_at"), zone)
    view = {
        "resourceType": "CrmAppointment",
        "id": appointment_id,
        "status": status,
        "start": _iso(start),
        "end": _iso(end),
        "contact": contact,
        "event_type": event.get("event_type"),
        "event_id": event.get("event_id"),
        "object_id": event.get("object_id"),
        "occurred_at": _iso(occurred),
        "payload": event.get("payload"),
        "object": event.get("object"),
    }
    return Described(appointment_id, Snapshot(status, start, end, version, (contact,), occurred), view, zone)


@dataclass(frozen=True)
class Contact:
    address: str | None  # the first usable address found, as it is (never trimmed or split)
    languages: tuple[str, ...]
    name: str


def contact_of(settings: CrmAppointmentConfig, event: dict[str, Any], recipient: str | None = None) -> Contact:
    """Who to write to: the address (`recipient` overrides the declaration's path), language and name."""
    found = read_path(recipient or settings.recipient, event)
    address = next((v for v in found if isinstance(v, str) and usable(v)), None)
    languages = tuple(str(v) for v in read_path(settings.language, event) if isinstance(v, str) and v)
    name = " ".join(str(v) for v in read_path(settings.name, event) if isinstance(v, (str, int)))
    return Contact(address, languages, name)


@dataclass(frozen=True)
class AppointmentEmail:
    """Everything rendering a CrmAppointment mapping needs besides the mapping."""

    key: str
    event: str  # the lifecycle event the notification was planned for
    source: str
    described: Described
    contact: Contact
    to: str
    locale: str
    now: datetime
    default_from: str
    default_reply_to: str | None = None
    links: dict[str, str] = field(default_factory=dict)  # unsubscribe_url (with `links:` in the config)


def render_appointment(mapping: Mapping, request: AppointmentEmail) -> Email:
    """Render a CrmAppointment mapping in the first of the contact's languages it has templates for."""
    view = request.described.view
    values = {
        "appointment": view,
        "patient_name": request.contact.name,
        "start": request.described.snapshot.start,
        "end": request.described.snapshot.end,
        "event": request.event,
        "source": request.source,
        "timezone": request.described.zone,
        "now": request.now,
        **{name: view.get(name) for name in ("payload", "object", "event_type", "event_id", "object_id")},
        "occurred_at": view.get("occurred_at"),
        **request.links,
    }
    return render_with(
        mapping,
        values,
        key=request.key,
        to=request.to,
        locale=request.locale,
        languages=list(request.contact.languages),
        default_from=request.default_from,
        default_reply_to=request.default_reply_to,
    )
