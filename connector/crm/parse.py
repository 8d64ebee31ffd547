"""Turning a verified CRM webhook body into `CrmEvent` values. Pure: bytes in, events out.

Every failure raises `BodyError` with a fixed message that names the event's position and the field, never a
value from the body (bodies carry patient data). Exceptions from the JSON and XML parsers are not chained:
they hold the body text (`JSONDecodeError.doc`) and must not reach a log through `__cause__`.

Nesting is bounded: JSON and sObject fields deeper than `MAX_DEPTH` are rejected, so no later recursive walk
(mapping, json.dumps, templates) can be driven into a RecursionError by a sender. JSON bodies holding a lone
surrogate escape, NaN or an infinite number are refused too (connector.jsontext).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from connector import jsontext
from connector.errors import ConnectorError

MAX_DEPTH = 32

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SF_OUTBOUND = "http://soap.sforce.com/2005/09/outbound"
XSI = "http://www.w3.org/2001/XMLSchema-instance"

# In a well-formed document "<!" opens a comment, a CDATA section or a DTD; only the DTD can declare entities.
_DTD = re.compile(r"<!(?!--|\[CDATA\[)")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class BodyError(ConnectorError):
    """The body cannot be turned into events; answer 400. The message never quotes the body."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class CrmEvent:
    """One change announced by a CRM. `event_id` is the sender's id, the key for deduplication."""

    source_kind: str  # "standard_webhook", "hubspot", "salesforce", or the kind given to parse_hmac_json
    event_id: str
    event_type: str
    object_id: str | None
    occurred_at: str | None  # ISO 8601 as the sender wrote it; HubSpot's epoch milliseconds become UTC ISO
    payload: dict[str, Any]


# --- JSON senders ------------------------------------------------------------------------------------------


def parse_standard_webhook(headers: Mapping[str, str], body: bytes) -> list[CrmEvent]:
    """One event: id from `webhook-id`, type from `type`, time from `timestamp`, object id from `data.id`."""
    msg_id = next((v for k, v in headers.items() if k.lower() == "webhook-id"), "")
    if not msg_id:
        raise BodyError("missing header webhook-id")
    document = _json_object(_load_json(body), "body")
    data = document.get("data")
    return [
        CrmEvent(
            source_kind="standard_webhook",
            event_id=msg_id,
            event_type=_text(document.get("type"), "type", "body"),
            object_id=_optional_id(data.get("id")) if isinstance(data, dict) else None,
            occurred_at=_optional_text(document.get("timestamp")),
            payload=document,
        )
    ]


def parse_hubspot(body: bytes) -> list[CrmEvent]:
    """One event per element of HubSpot's JSON array (`eventId`, `subscriptionType`, `objectId`, `occurredAt`)."""
    document = _load_json(body)
    if not isinstance(document, list):
        raise BodyError("body is not a JSON array")
    events = []
    for index, item in enumerate(document):
        where = f"event {index}"
        event = _json_object(item, where)
        events.append(
            CrmEvent(
                source_kind="hubspot",
                event_id=_id(event.get("eventId"), "eventId", where),
                event_type=_text(event.get("subscriptionType"), "subscriptionType", where),
                object_id=_optional_id(event.get("objectId")),
                occurred_at=_epoch_ms(event.get("occurredAt"), where),
                payload=event,
            )
        )
    return events


def parse_hmac_json(
    body: bytes,
    id_path: str = "id",
    type_path: str = "type",
    *,
    object_id_path: str | None = None,
    occurred_at_path: str | None = None,
    source_kind: str = "hmac_json",
) -> list[CrmEvent]:
    """A JSON object, or an array of objects, one event each; fields found by dotted paths such as `meta.id`."""
    document = _load_json(body)
    items = document if isinstance(document, list) else [document]
    events = []
    for index, item in enumerate(items):
        where = f"event {index}"
        event = _json_object(item, where)
        events.append(
            CrmEvent(
                source_kind=source_kind,
                event_id=_id(_at(event, id_path), id_path, where),
                event_type=_text(_at(event, type_path), type_path, where),
                object_id=_optional_id(_at(event, object_id_path)) if object_id_path else None,
                occurred_at=_optional_text(_at(event, occurred_at_path)) if occurred_at_path else None,
                payload=event,
            )
        )
    return events


def _load_json(body: bytes) -> Any:
    try:
        return jsontext.load(body, MAX_DEPTH)
    except jsontext.BadJson as exc:  # a fixed reason: not JSON, too deep, not finite, a lone surrogate
        raise BodyError(str(exc)) from None


def _json_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BodyError(f"{where}: not a JSON object")
    return value


def _at(document: dict[str, Any], path: str) -> Any:
    value: Any = document
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise BodyError(f"{where}: field '{field}' missing or not a non-empty string")
    return value


def _id(value: Any, field: str, where: str) -> str:
    found = _optional_id(value)
    if found is None:
        raise BodyError(f"{where}: field '{field}' missing or not a string or integer id")
    return found


def _optional_id(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value:
        return value
    return None


def _optional_text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _epoch_ms(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BodyError(f"{where}: field 'occurredAt' is not epoch milliseconds")
    try:
        moment = _EPOCH + timedelta(milliseconds=value)
    except OverflowError:
        raise BodyError(f"{where}: field 'occurredAt' is out of range") from None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- Salesforce Outbound Messaging -------------------------------------------------------------------------


def parse_salesforce_outbound(body: bytes, expected_org_id: str | None) -> list[CrmEvent]:
    """One event per `Notification` of a SOAP `notifications` message: id = Notification Id, type = the sObject
    type (`sf:Contact` → "Contact"), object id and payload from the sObject's fields.

    `expected_org_id` may be the 15- or the 18-character form; None skips the check. The organization id is
    not a secret: it routes, it does not authenticate.
    """
    notifications = _notifications(_parse_xml(body))
    organization_id = _child_text(notifications, "OrganizationId", "notifications")
    _child_text(notifications, "ActionId", "notifications")
    if expected_org_id is not None and not _same_org(organization_id, expected_org_id):
        raise BodyError("organization id mismatch")
    items = notifications.findall(f"{{{SF_OUTBOUND}}}Notification")
    if not items:
        raise BodyError("notifications: no Notification element")
    return [_notification(item, f"notification {index}") for index, item in enumerate(items)]


def salesforce_ack(ok: bool = True) -> bytes:
    """The SOAP `notificationsResponse` Salesforce waits for; anything else (or `false`) makes it retry."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<soapenv:Envelope xmlns:soapenv="{SOAP_ENV}">'
        "<soapenv:Body>"
        f'<notificationsResponse xmlns="{SF_OUTBOUND}">'
        f"<Ack>{'true' if ok else 'false'}</Ack>"
        "</notificationsResponse>"
        "</soapenv:Body>"
        "</soapenv:Envelope>\n"
    ).encode()


def _parse_xml(body: bytes) -> ET.Element:
    try:
        text = body.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise BodyError("body is not UTF-8") from None
    if _DTD.search(text):
        raise BodyError("body holds a DTD or entity declaration, which is not allowed")
    try:
        # S314: safe here. Without a DTD no entity can be declared (no XXE, no billion laughs), and parsing a
        # str makes expat ignore the encoding named in the XML declaration, so the check above saw the text.
        return ET.fromstring(text)  # noqa: S314
    except ET.ParseError:
        raise BodyError("body is not well-formed XML") from None


def _notifications(root: ET.Element) -> ET.Element:
    if root.tag != f"{{{SOAP_ENV}}}Envelope":
        raise BodyError("body is not a SOAP envelope")
    soap_body = root.find(f"{{{SOAP_ENV}}}Body")
    notifications = soap_body.find(f"{{{SF_OUTBOUND}}}notifications") if soap_body is not None else None
    if notifications is None:
        raise BodyError("SOAP body holds no Salesforce notifications element")
    return notifications


def _notification(item: ET.Element, where: str) -> CrmEvent:
    notification_id = _child_text(item, "Id", where)
    sobject = item.find(f"{{{SF_OUTBOUND}}}sObject")
    if sobject is None:
        raise BodyError(f"{where}: no sObject element")
    sobject_type = (sobject.get(f"{{{XSI}}}type") or "").rpartition(":")[2]
    if not sobject_type:
        raise BodyError(f"{where}: sObject has no xsi:type")
    fields = _fields(sobject, where, depth=1)
    timestamp = fields.get("LastModifiedDate") or fields.get("SystemModstamp")
    return CrmEvent(
        source_kind="salesforce",
        event_id=notification_id,
        event_type=sobject_type,
        object_id=_optional_text(fields.get("Id")),
        occurred_at=_optional_text(timestamp),
        payload=fields,
    )


def _fields(element: ET.Element, where: str, depth: int) -> dict[str, Any]:
    """Child elements as {local name: text, None if xsi:nil, or a dict for a nested record}."""
    if depth > MAX_DEPTH:
        raise BodyError(f"{where}: sObject nests too deeply")
    fields: dict[str, Any] = {}
    for child in element:
        name = _local(child.tag)
        if name in fields:
            raise BodyError(f"{where}: sObject repeats a field")
        if child.get(f"{{{XSI}}}nil") == "true":
            fields[name] = None
        elif len(child):
            fields[name] = _fields(child, where, depth + 1)
        else:
            fields[name] = child.text or ""
    return fields


def _child_text(parent: ET.Element, name: str, where: str) -> str:
    child = parent.find(f"{{{SF_OUTBOUND}}}{name}")
    text = child.text.strip() if child is not None and child.text else ""
    if not text:
        raise BodyError(f"{where}: missing {name}")
    return text


def _same_org(received: str, expected: str) -> bool:
    """Salesforce ids come in a case-sensitive 15-character form and an 18-character form (15 + checksum)."""
    if len(received) == len(expected):
        return received == expected
    if {len(received), len(expected)} == {15, 18}:
        return received[:15] == expected[:15]
    return False


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]
