"""Pure: what the connector writes to the EHR about a notification — a `Communication` for an email Paubox
accepted (`status: completed`), or for a skipped one (`not-done`, with the ledger's reason) where a source
asks for it — and when a failed write is tried again.

    communication(fact, system=..., reminder=True, topic="Reminder two days before")

The resource is `about` the Appointment (`basedOn` is for orders and plans), its `subject` and `recipient`
the Patient, `medium` email, `sent` the time Paubox accepted it, `topic` the email's subject (or, when the
process that sent it has restarted since, the mapping's description: the ledger keeps no rendered text), and
a `category` from the mapping (reminder for a mapping with `at:`, else notification). It carries the message
text only where a source asks for it (`write_back.content: full`). Its `identifier` is derived from the
notification's key (a SHA-256: keys contain `|`, which a FHIR token search reads as the system separator),
so a conditional create (`If-None-Exist`) finds the first one after a retry, a restart, a replay or on a
second replica.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/communication-category"
MEDIUM_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode"


@dataclass(frozen=True)
class Fact:
    """What write-back knows of a notification: ids, times and the ledger's reason, never patient data."""

    kind: str  # communication or not-done
    key: str
    appointment_id: str
    patient_id: str
    sent_at: datetime | None
    reason: str | None = None


def identifier_value(kind: str, key: str) -> str:
    """The identifier value of what is written for a notification: stable, and safe in a token search."""
    return f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:40]}"


def identifier_condition(system: str, value: str) -> str:
    """`identifier=system|value` as an `If-None-Exist` header: a query string, so the system is
    percent-encoded (an `&`, `+`, `%` or `#` in it would otherwise search for something else)."""
    return f"identifier={quote(system, safe=':/')}|{quote(value, safe='')}"


def if_none_exist(system: str, kind: str, key: str) -> str:
    return identifier_condition(system, identifier_value(kind, key))


def instant(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def communication(
    fact: Fact, *, system: str, reminder: bool, topic: str, text: str | None = None, note: str | None = None
) -> dict[str, Any]:
    """The Communication for `fact`: `completed` for a sent email, `not-done` (with `statusReason`) for a
    skipped notification. `text`: the message as its payload (`write_back.content: full`); `note`: a note."""
    patient = {"reference": f"Patient/{fact.patient_id}"}
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        "identifier": [{"system": system, "value": identifier_value(fact.kind, fact.key)}],
        "status": "completed" if fact.kind == "communication" else "not-done",
        "category": [{"coding": [{"system": CATEGORY_SYSTEM, "code": "reminder" if reminder else "notification"}]}],
        "medium": [{"coding": [{"system": MEDIUM_SYSTEM, "code": "EMAILWRIT", "display": "email"}]}],
        "subject": patient,
        "about": [{"reference": f"Appointment/{fact.appointment_id}"}],
        "recipient": [patient],
        "topic": {"text": topic},
    }
    if fact.kind == "communication":
        if fact.sent_at is not None:
            resource["sent"] = instant(fact.sent_at)
    else:
        resource["statusReason"] = {"text": (fact.reason or "not sent")[:500]}
    if text:
        resource["payload"] = [{"contentString": text}]
    if note:
        resource["note"] = [{"text": note}]
    return resource


def backoff(attempts: int, base: timedelta, cap: timedelta) -> timedelta:
    """How long to wait after `attempts` failed tries: doubling from `base`, at most `cap`."""
    grown: timedelta = base * (2 ** min(max(attempts - 1, 0), 30))
    return min(cap, grown)
