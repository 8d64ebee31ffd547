"""Pure decisions: which notifications a transition calls for, and what an email says.

`plan` runs when a transition is seen (it needs the Appointment only); `render` runs when a notification
is due (it needs the Patient too). Both take values and return values; time comes in as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connector.errors import ConnectorError
from connector.fhir import display_name, parse_instant
from connector.lifecycle import BOOKED, REMOVED, RESCHEDULED, Transition
from connector.mapping.templates import error_line, safe_error
from connector.models import Email, PlannedNotification, PlanNote, State
from connector.timing import QuietHours, offset_label, schedule

if TYPE_CHECKING:
    from connector.mapping.loader import Mapping, MappingSet

MAX_KEY_LENGTH = 500


@dataclass
class Plan:
    notifications: list[PlannedNotification] = field(default_factory=list)
    notes: list[PlanNote] = field(default_factory=list)


@dataclass(frozen=True)
class Situation:
    """Everything about one appointment that planning depends on."""

    source: str
    appointment: dict[str, Any]
    version: str
    zone: str
    quiet: QuietHours | None
    notified: frozenset[str]  # patients who were already sent an email about this appointment
    now: datetime
    resource_type: str = "Appointment"  # or "CrmAppointment": an appointment described by CRM events
    reschedule_on: frozenset[str] = frozenset({"start"})  # the global default; a mapping may say otherwise


def key_instant(value: Any) -> str:
    """The start as it goes into keys: UTC, second precision, whatever format the server used."""
    moment = parse_instant(value)
    return "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan(mappings: MappingSet, transition: Transition, situation: Situation) -> Plan:
    """The notifications `transition` calls for: per patient and matching mapping (and offset)."""
    result = Plan()
    if transition.event == REMOVED:
        return result
    for patient_id in transition.patients or ("",):
        event = transition.event
        if event == RESCHEDULED and patient_id not in situation.notified:
            if not transition.moves_start:
                continue  # never told, and the start stands: their confirmation still holds
            event = BOOKED  # never told about the old time: this is their confirmation
        for mapping in mappings:
            if _wanted(mapping, event, transition, situation):
                _plan_mapping(mapping, event, patient_id, situation, result)
    return result


def _wanted(mapping: Mapping, event: str, transition: Transition, situation: Situation) -> bool:
    if mapping.spec.trigger.resource != situation.resource_type:
        return False
    sources = mapping.spec.trigger.sources
    if sources is not None and situation.source not in sources:
        return False
    if mapping.spec.is_reminder:
        # reminders are (re-)armed whenever a booking gets a start; an end-only change leaves them be
        return event == BOOKED or (event == RESCHEDULED and transition.moves_start)
    if event not in mapping.spec.trigger.event:
        return False
    if event == RESCHEDULED and transition.changed:
        wanted = mapping.spec.reschedule_on
        return bool(transition.changed & (frozenset(wanted) if wanted is not None else situation.reschedule_on))
    return True


def _plan_mapping(mapping: Mapping, event: str, patient_id: str, situation: Situation, result: Plan) -> None:
    appointment = situation.appointment
    if mapping.condition is not None:
        try:
            if mapping.condition(appointment) != [True]:
                return
        except Exception as exc:  # noqa: BLE001 - fhirpathpy raises bare Exception
            result.notes.append(PlanNote(mapping.name, patient_id, f"condition failed ({type(exc).__name__})", True))
            return
    if mapping.spec.needs_prior_email and patient_id not in situation.notified:
        result.notes.append(
            PlanNote(mapping.name, patient_id, "not sent: no earlier email about this appointment went to this patient")
        )
        return
    key_event = BOOKED if mapping.spec.is_reminder else event
    context = {
        "appointment": appointment,
        "patient_id": patient_id,
        "event": key_event,
        "mapping": mapping.name,
        "source": situation.source,
        "start": key_instant(appointment.get("start")),
    }
    try:
        rendered = mapping.key.render(context).strip()
    except Exception as exc:  # noqa: BLE001 - any template failure is reported the same way
        result.notes.append(PlanNote(mapping.name, patient_id, f"key template failed: {safe_error(exc)}", True))
        return
    start = parse_instant(appointment.get("start"))
    offsets: list[timedelta | None] = list(mapping.spec.at) if mapping.spec.at else [None]
    for offset in offsets:
        key = f"{situation.source}:{mapping.name}:{rendered}" + (
            f"@{offset_label(offset)}" if offset is not None else ""
        )
        if not rendered or len(key) > MAX_KEY_LENGTH:
            result.notes.append(
                PlanNote(
                    mapping.name,
                    patient_id,
                    f"key template gave an empty key or one longer than {MAX_KEY_LENGTH} characters",
                    True,
                )
            )
            return
        timing = schedule(
            now=situation.now,
            start=start,
            offset=offset,
            zone=situation.zone,
            quiet=situation.quiet if mapping.spec.quiet_hours else None,
            late_grace=mapping.spec.late_grace,
        )
        state, reason = State.PENDING, None
        if not patient_id:
            state, reason = State.SKIPPED, "no patient participant to write to"
        elif timing.skipped is not None:
            state, reason = State.SKIPPED, timing.skipped
        result.notifications.append(
            PlannedNotification(
                key=key,
                source=situation.source,
                mapping=mapping.name,
                event=key_event,
                resource_type=situation.resource_type,
                resource_id=str(appointment.get("id")),
                resource_version=situation.version,
                patient_id=patient_id,
                due_at=timing.due or situation.now,
                state=state,
                reason=reason,
                appointment_start=start,
            )
        )


def plan_crm(
    mappings: MappingSet,
    *,
    source: str,
    inbox_id: int,
    event: dict[str, Any],
    now: datetime,
    zone: str,
    quiet: QuietHours | None,
) -> Plan:
    """The notifications a CRM event calls for: one per matching mapping (the address is read when sending)."""
    result = Plan()
    event_type = str(event.get("event_type") or "")
    for mapping in mappings:
        spec = mapping.spec
        if (
            not spec.is_crm
            or event_type not in spec.trigger.event
            or (spec.trigger.sources is not None and source not in spec.trigger.sources)
        ):
            continue
        if mapping.condition is not None:
            try:
                if mapping.condition(event) != [True]:
                    continue
            except Exception as exc:  # noqa: BLE001 - fhirpathpy raises bare Exception
                result.notes.append(PlanNote(mapping.name, "", f"condition failed ({type(exc).__name__})", True))
                continue
        context = {
            "payload": event.get("payload"),
            "event_id": event.get("event_id"),
            "event_type": event_type,
            "object_id": event.get("object_id"),
            "mapping": mapping.name,
            "source": source,
        }
        try:
            rendered = mapping.key.render(context).strip()
        except Exception as exc:  # noqa: BLE001 - any template failure is reported the same way
            result.notes.append(PlanNote(mapping.name, "", f"key template failed: {safe_error(exc)}", True))
            continue
        key = f"{source}:{mapping.name}:{rendered}"
        if not rendered or len(key) > MAX_KEY_LENGTH:
            result.notes.append(PlanNote(mapping.name, "", "key template gave an empty or too long key", True))
            continue
        timing = schedule(
            now=now, start=None, offset=None, zone=zone, quiet=quiet if spec.quiet_hours else None, late_grace=None
        )
        result.notifications.append(
            PlannedNotification(
                key=key,
                source=source,
                mapping=mapping.name,
                event=event_type[:32],
                resource_type="CrmEvent",
                resource_id=str(inbox_id),
                resource_version=str(event.get("event_id"))[:128],
                patient_id="",
                due_at=timing.due or now,
            )
        )
    return result


class RenderError(ConnectorError):
    """A template failed; the message is PHI-safe (see templates.safe_error). `file` and `line`: where, when
    known (the template file, or the mapping file for an inline subject)."""

    def __init__(self, message: str, file: Path | None = None, line: int | None = None, what: str = "") -> None:
        super().__init__(message)
        self.file, self.line, self.what = file, line, what


@dataclass(frozen=True)
class RenderRequest:
    """Everything rendering an Appointment mapping needs besides the mapping: the message's key and
    recipient, the resources, and how to write dates (zone, locale, the patient's languages)."""

    key: str
    to: str
    appointment: dict[str, Any]
    patient: dict[str, Any]
    event: str
    source: str
    timezone: str
    locale: str
    now: datetime
    default_from: str
    default_reply_to: str | None = None
    languages: tuple[str, ...] = ()
    links: dict[str, str] = field(default_factory=dict)  # confirm_url, cancel_url, unsubscribe_url

    def context(self) -> dict[str, Any]:
        """What the templates see (besides the mapping's own names, added by `render_with`)."""
        return {
            **self.links,
            "appointment": self.appointment,
            "patient": self.patient,
            "patient_name": display_name(self.patient),
            "start": parse_instant(self.appointment.get("start")),
            "end": parse_instant(self.appointment.get("end")),
            "event": self.event,
            "source": self.source,
            "timezone": self.timezone,
            "now": self.now,
        }


@dataclass(frozen=True)
class CrmRenderRequest:
    """Everything rendering a CRM event mapping needs besides the mapping."""

    key: str
    to: str
    event: dict[str, Any]
    source: str
    timezone: str
    locale: str
    now: datetime
    default_from: str
    default_reply_to: str | None = None
    links: dict[str, str] = field(default_factory=dict)  # unsubscribe_url (with `links:` in the config)

    def context(self) -> dict[str, Any]:
        """What the templates see: the event (`payload`, `event_type`, ...), the source, zone and time."""
        return {
            **self.links,
            "payload": self.event.get("payload"),
            "event_id": self.event.get("event_id"),
            "event_type": self.event.get("event_type"),
            "object_id": self.event.get("object_id"),
            "occurred_at": self.event.get("occurred_at"),
            "object": self.event.get("object"),
            "source": self.source,
            "timezone": self.timezone,
            "now": self.now,
        }


def render(mapping: Mapping, request: RenderRequest) -> Email:
    """Render an Appointment mapping for one recipient, in the first of the request's languages it has
    templates for."""
    return render_with(
        mapping,
        request.context(),
        key=request.key,
        to=request.to,
        locale=request.locale,
        languages=list(request.languages),
        default_from=request.default_from,
        default_reply_to=request.default_reply_to,
    )


def render_crm(mapping: Mapping, request: CrmRenderRequest) -> Email:
    """Render a CRM event mapping (templates see the event: `payload`, `event_type`, ...)."""
    return render_with(
        mapping,
        request.context(),
        key=request.key,
        to=request.to,
        locale=request.locale,
        languages=[],
        default_from=request.default_from,
        default_reply_to=request.default_reply_to,
    )


def render_with(
    mapping: Mapping,
    values: dict[str, Any],
    *,
    key: str,
    to: str,
    locale: str,
    languages: list[str],
    default_from: str,
    default_reply_to: str | None,
) -> Email:
    language, variant = mapping.variant_for(languages)
    if language != mapping.spec.language:
        locale = language.replace("-", "_")
    context = {**values, "mapping": mapping.name, "vars": mapping.spec.vars, "locale": locale, "language": language}
    parts: dict[str, str | None] = {}
    for part, template in (("subject", variant.subject), ("text", variant.text), ("html", variant.html)):
        if template is None:
            parts[part] = None
            continue
        try:
            parts[part] = template.render(context)
        except Exception as exc:  # noqa: BLE001 - reported without data, see safe_error
            where = template.name or part
            inline = not template.filename or template.filename.startswith("<")
            raise RenderError(
                f"mapping {mapping.name!r}, {where}: {safe_error(exc, template)}",
                mapping.path if inline else Path(template.filename or ""),
                None if inline else error_line(exc, template),
                f"templates.{part}" if inline else "",
            ) from None
    subject = " ".join((parts["subject"] or "").split())
    if not subject:
        raise RenderError(f"mapping {mapping.name!r}: the subject rendered empty")
    return Email(
        notification_key=key,
        to=to,
        from_address=mapping.spec.from_address or default_from,
        reply_to=mapping.spec.reply_to or default_reply_to,
        subject=subject,
        text=parts["text"] or "",
        html=parts["html"],
    )
