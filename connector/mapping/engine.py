"""Pure decisions: which notifications an event calls for, and what an email says.

`plan` runs when an event is seen (it needs the Appointment only); `render` runs when a notification is
due (it needs the Patient too). Both take values and return values; time comes in as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from connector.fhir import display_name, parse_instant, patient_participants
from connector.mapping.loader import Mapping, MappingSet
from connector.mapping.templates import safe_error
from connector.models import AppointmentEvent, Email, PlannedNotification, State

MAX_KEY_LENGTH = 500


@dataclass(frozen=True)
class PlanProblem:
    """A mapping that could not be applied to an event (safe to log: no resource content)."""

    mapping: str
    message: str


@dataclass(frozen=True)
class Plan:
    notifications: list[PlannedNotification]
    problems: list[PlanProblem]


def plan(mappings: MappingSet, event: AppointmentEvent, now: datetime) -> Plan:
    """The notifications `event` calls for: one per matching mapping and patient participant.

    A notification for an appointment whose start has already passed is planned as `skipped`, so the
    ledger shows why nothing went out."""
    appointment = event.resource
    notifications: list[PlannedNotification] = []
    problems: list[PlanProblem] = []
    start = parse_instant(appointment.get("start"))
    for mapping in mappings:
        if not mapping.applies_to(event.source, event.resource_type, event.event):
            continue
        if mapping.condition is not None:
            try:
                if mapping.condition(appointment) != [True]:
                    continue
            except Exception as exc:  # noqa: BLE001 - fhirpathpy raises bare Exception
                problems.append(PlanProblem(mapping.name, f"condition failed ({type(exc).__name__})"))
                continue
        patients = patient_participants(appointment) or [""]
        for patient_id in patients:
            context = {"appointment": appointment, "patient_id": patient_id, "event": event.event,
                       "mapping": mapping.name, "source": event.source, "start": appointment.get("start", "")}
            try:
                rendered = mapping.key.render(context).strip()
            except Exception as exc:  # noqa: BLE001 - any template failure is reported the same way
                problems.append(PlanProblem(mapping.name, f"key template failed: {safe_error(exc)}"))
                continue
            key = f"{event.source}:{mapping.name}:{rendered}"
            if not rendered or len(key) > MAX_KEY_LENGTH:
                problems.append(PlanProblem(mapping.name, f"key template gave an empty key or one longer than "
                                                          f"{MAX_KEY_LENGTH} characters"))
                continue
            state, reason = State.PENDING, None
            if not patient_id:
                state, reason = State.SKIPPED, "no patient participant to write to"
            elif start is not None and start <= now:
                state, reason = State.SKIPPED, "the appointment start has already passed"
            notifications.append(PlannedNotification(
                key=key, source=event.source, mapping=mapping.name, event=event.event,
                resource_type=event.resource_type, resource_id=event.resource_id,
                resource_version=event.version, patient_id=patient_id, due_at=now, state=state, reason=reason,
            ))
    return Plan(notifications, problems)


class RenderError(Exception):
    """A template failed; the message is PHI-safe (see templates.safe_error)."""


def render(mapping: Mapping, *, key: str, to: str, appointment: dict[str, Any], patient: dict[str, Any],
           event: str, source: str, timezone: str, locale: str, now: datetime,
           default_from: str, default_reply_to: str | None) -> Email:
    """Render the mapping's subject, text and HTML for one recipient."""
    context = {
        "appointment": appointment, "patient": patient, "patient_name": display_name(patient),
        "start": parse_instant(appointment.get("start")), "end": parse_instant(appointment.get("end")),
        "event": event, "mapping": mapping.name, "source": source, "vars": mapping.spec.vars,
        "timezone": timezone, "locale": locale, "now": now,
    }
    parts: dict[str, str | None] = {}
    for part, template in (("subject", mapping.subject), ("text", mapping.text), ("html", mapping.html)):
        if template is None:
            parts[part] = None
            continue
        try:
            parts[part] = template.render(context)
        except Exception as exc:  # noqa: BLE001 - reported without data, see safe_error
            where = template.name or part
            raise RenderError(f"mapping {mapping.name!r}, {where}: {safe_error(exc, template)}") from None
    subject = " ".join((parts["subject"] or "").split())
    if not subject:
        raise RenderError(f"mapping {mapping.name!r}: the subject rendered empty")
    return Email(
        notification_key=key, to=to,
        from_address=mapping.spec.from_address or default_from,
        reply_to=mapping.spec.reply_to or default_reply_to,
        subject=subject, text=parts["text"] or "", html=parts["html"],
    )
