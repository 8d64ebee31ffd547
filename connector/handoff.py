"""Pure: the hand-off to staff when a notification cannot reach its patient — why (`reason_of`), the FHIR
`Task` for the front desk (`task`, one per appointment and patient: a later reason is added to it as a
note, `with_reason`), and the JSON event for sites whose work queue is elsewhere (`event`).

    reason_of(State.SKIPPED, "Patient/p9 has no usable email address") → "no-address"

Every text here is built from the ledger's reasons, which name ids and rules, never patient data.
"""

from __future__ import annotations

import copy
import hashlib
from datetime import UTC, datetime
from typing import Any

from connector.models import State

CODE_SYSTEM = "urn:connector:handoff"
WHY = {
    "no-address": "no usable email address",
    "opted-out": "opted out of email",
    "bounce": "email to the address bounced",
    "failed": "the email could not be sent",
}


def reason_of(state: State, reason: str | None) -> str | None:
    """Which hand-off reason a settled notification has (None: none; it was sent, withdrawn, ...)."""
    if state is State.FAILED:
        return "failed"
    if state is not State.SKIPPED or not reason:
        return None
    text = reason.lower()
    if "bounced" in text:
        return "bounce"
    if "no usable email address" in text or "not found on source" in text:
        return "no-address"
    if "opted out" in text:
        return "opted-out"
    return None


def task_identifier(source: str, appointment_id: str, patient_id: str) -> str:
    """One Task per appointment and patient, however many notifications are handed off."""
    digest = hashlib.sha256(f"{source}|{appointment_id}|{patient_id}".encode()).hexdigest()[:40]
    return f"handoff-{digest}"


def note_of(reason: str, mapping: str, detail: str | None) -> str:
    return f"{WHY[reason]} ({mapping}): {detail or reason}"[:1000]


def task(
    *,
    system: str,
    source: str,
    appointment_id: str,
    patient_id: str,
    reason: str,
    mapping: str,
    detail: str | None,
    owner: str | None,
    now: datetime,
) -> dict[str, Any]:
    """A `requested` order for staff to reach the patient another way, `focus` the Appointment."""
    resource: dict[str, Any] = {
        "resourceType": "Task",
        "identifier": [{"system": system, "value": task_identifier(source, appointment_id, patient_id)}],
        "status": "requested",
        "intent": "order",
        "code": {
            "coding": [{"system": CODE_SYSTEM, "code": "contact-patient"}],
            "text": "Contact the patient: email cannot reach them",
        },
        "description": f"Email could not reach the patient about this appointment: {WHY[reason]} ({mapping})",
        "focus": {"reference": f"Appointment/{appointment_id}"},
        "for": {"reference": f"Patient/{patient_id}"},
        "authoredOn": now.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "note": [{"text": note_of(reason, mapping, detail)}],
    }
    if owner:
        resource["owner"] = {"reference": owner}
    return resource


def with_reason(existing: dict[str, Any], note: str) -> dict[str, Any] | None:
    """The Task with another reason noted, or None when that note is there already."""
    notes = existing.get("note") if isinstance(existing.get("note"), list) else []
    if any(isinstance(n, dict) and n.get("text") == note for n in notes or []):
        return None
    changed = copy.deepcopy(existing)
    changed["note"] = [*(notes or []), {"text": note}]
    changed.pop("meta", None)
    return changed


def event(
    *,
    key: str,
    source: str,
    resource: str,
    patient: str | None,
    reason: str,
    mapping: str,
    detail: str | None,
    now: datetime,
) -> dict[str, Any]:
    """The JSON a hand-off webhook receives: ids and reasons, no address and no message. `patient`:
    `Patient/<id>` for an appointment, the CRM's own id for a CRM event (or None)."""
    return {
        "type": "handoff.requested",
        "notification": key,
        "source": source,
        "resource": resource,
        "patient": patient,
        "reason": reason,
        "why": WHY[reason],
        "mapping": mapping,
        "detail": detail,
        "occurred_at": now.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
