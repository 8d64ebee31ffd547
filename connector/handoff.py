"""Pure: the hand-off to staff when a notification cannot reach its patient — why (`reason_of`), the FHIR
`Task` for the front desk (`task`, one per appointment and patient: a later reason is added to it as a
note, `with_reason`), and the JSON event for sites whose work queue is elsewhere (`event`).

    reason_of(State.SKIPPED, "Patient/p9 has no usable email address") → "no-address"

Every text here is built from the ledger's reasons, which name ids and rules, never patient data.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from connector.models import State

if TYPE_CHECKING:
    from collections.abc import Iterable

    from connector.config.handoff import HandoffConfig
    from connector.mapping.loader import Mapping
    from connector.mapping.spec import HandoffSpec

CODE_SYSTEM = "urn:connector:handoff"
WHY = {
    "no-address": "no usable email address",
    "opted-out": "opted out of email",
    "bounce": "email to the address bounced",
    "failed": "the email could not be sent",
}


def active(settings: HandoffConfig | None, mappings: Iterable[Mapping]) -> bool:
    """Whether anything may be handed off: a `handoff:` section, or a mapping that turns it on."""
    return settings is not None or any(m.spec.handoff is not None and m.spec.handoff.enabled for m in mappings)


def to_tasks(settings: HandoffConfig | None, mappings: Iterable[Mapping]) -> bool:
    """Whether hand-offs are FHIR Tasks written to the appointments' sources."""
    return active(settings, mappings) and (settings is None or settings.to == "task")


# The preparer's opt-out reasons (connector.sending.recipients): "Patient/p1 opted out of 'reminders' email
# (by email, link, 2026-11-30)" for one category, "Patient/p1 opted out (by email, bounce, …)" for every email.
_CATEGORY_OPTOUT = re.compile(r"opted out of '[^']*' email")
_BOUNCE_OPTOUT = re.compile(r"opted out(?: of '[^']*' email)? \(by \w+, bounce,")


def reason_of(state: State, reason: str | None) -> str | None:
    """Which hand-off reason a settled notification has (None: none; it was sent, withdrawn, ...)."""
    if state is State.FAILED:
        return "failed"
    if state is not State.SKIPPED or not reason:
        return None
    text = reason.lower()
    if "bounced" in text or _BOUNCE_OPTOUT.search(text):  # suppressed, or on the opt-out list by a bounce
        return "bounce"
    if "no usable email address" in text or "not found on source" in text:
        return "no-address"
    if "opted out" in text:
        return "opted-out"
    return None


def category_optout(reason: str | None) -> bool:
    """Whether a skip's reason is an opt-out of one category of email, not of every email."""
    return bool(reason) and _CATEGORY_OPTOUT.search(reason or "") is not None


@dataclass(frozen=True)
class Rules:
    """The hand-off as it applies to one mapping: the config's `handoff:` with the mapping's own over it."""

    reasons: tuple[str, ...]
    owner: str | None
    category_optouts: bool


def rules_for(mapping: str, settings: HandoffConfig | None, own: HandoffSpec | None) -> Rules | None:
    """How notifications of `mapping` are handed off (None: they are not). A mapping's `handoff: false`
    wins; its `handoff:` (true or keys) turns it on even outside `handoff.mappings` or without a `handoff:`
    section, each key it gives overriding the config's."""
    if own is not None and not own.enabled:
        return None
    if own is None and (settings is None or (settings.mappings is not None and mapping not in settings.mappings)):
        return None
    reasons = (own.reasons if own is not None else None) or (settings.reasons if settings is not None else None)
    owner = (own.owner if own is not None else None) or (settings.owner if settings is not None else None)
    categories = own.category_optouts if own is not None else None
    if categories is None:
        categories = settings.category_optouts if settings is not None else False
    return Rules(tuple(reasons or WHY), owner, categories)


def wanted(state: State, reason: str | None, rules: Rules | None, *, essential: bool) -> str | None:
    """The hand-off reason of a settled notification under `rules`, or None when it is not handed off. A
    skip because the patient opted out of a category (their choice) is not, unless `category_optouts` is
    on or the mapping is essential (then an operator's or a bounce's opt-out stopped a message the patient
    needs); an opt-out of every email is."""
    if rules is None:
        return None
    why = reason_of(state, reason)
    if why is None or why not in rules.reasons:
        return None
    if why == "opted-out" and category_optout(reason) and not (rules.category_optouts or essential):
        return None
    return why


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
