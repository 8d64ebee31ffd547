"""How a CRM source's events describe an appointment (`crm.<name>.appointment`), so that they feed the same
lifecycle as FHIR Appointments: remembered state, booked/rescheduled/cancelled, reminders armed, re-armed
and withdrawn (README, "CRM appointments").

Every path is FHIRPath over the stored event: `payload` (what the CRM sent), `event_type`, `event_id`,
`object_id`, `occurred_at`, and `object` (the CRM object, read through the CRM's API when `fetch_object` is
on). Paths are compiled when the config is read, so a typo is reported with its file and line.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from connector.config.base import Strict

# The states a CRM status may be mapped to: those of a FHIR Appointment.
Status = Literal[
    "proposed",
    "pending",
    "booked",
    "arrived",
    "fulfilled",
    "cancelled",
    "noshow",
    "entered-in-error",
    "checked-in",
    "waitlist",
]
_TRIAL: dict[str, Any] = {"event_id": "trial", "event_type": "trial", "object_id": None, "payload": {}, "object": {}}


def compiled_path(expression: str) -> str:
    """The expression, once fhirpathpy compiled and ran it on an empty event (it reports unknown functions
    only when an expression runs)."""
    import fhirpathpy  # here: only configs that declare CRM appointments need it (start-up stays lean)

    from connector.mapping.fhirpath_syntax import syntax_error  # fhirpathpy's parser forgives bad syntax

    syntax = syntax_error(expression)
    if syntax is not None:
        raise ValueError(f"FHIRPath does not parse, {syntax}")
    try:
        compiled: Any = fhirpathpy.compile(expression)
        compiled(dict(_TRIAL))
    except Exception as exc:  # noqa: BLE001 - fhirpathpy raises bare Exception for every parse/eval error
        raise ValueError(f"FHIRPath error: {exc}") from None
    return expression


class CrmStatus(Strict):
    """Where the status is, and what the CRM's values mean (values not listed are an error for the event)."""

    path: str | None = None
    map: dict[str, Status] = Field(default_factory=dict)
    default: Status | None = None  # when the path finds nothing (or there is no path)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return None if value is None else compiled_path(value)


class CrmAppointmentConfig(Strict):
    events: list[str] = Field(min_length=1, description="the event types that describe an appointment")
    condition: str | None = None  # FHIRPath giving true for the events that describe one (optional)
    id: str  # the appointment's id in the CRM
    start: str  # ISO 8601 (a time without an offset is local to `timezone`), or epoch milliseconds
    end: str | None = None
    timezone: str | None = None  # an IANA zone name in the event; else the source's `timezone`
    status: CrmStatus = CrmStatus(default="booked")
    recipient: str  # the address
    language: str | None = None  # e.g. nl or nl-BE: picks the template variant
    name: str | None = None  # the patient's name, for templates (`patient_name`)
    contact: str | None = None  # the contact's id in the CRM (default: one contact per appointment)
    occurred_at: str | None = None  # when the change happened; default: the event's own time
    fetch_object: bool = False  # hubspot: read the object through the CRM API (needs api_token)
    object_type: str | None = Field(None, pattern=r"^[a-z_0-9]{1,40}$")  # hubspot: e.g. meetings

    @field_validator(
        "condition", "id", "start", "end", "timezone", "recipient", "language", "name", "contact", "occurred_at"
    )
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        return None if value is None else compiled_path(value)
