"""The YAML mapping language: what a file in `mappings/` may say.

    name: appointment-booked            # unique; defaults to the file name
    description: Confirmation when an appointment is booked.
    trigger:
      resource: Appointment
      event: booked                     # see APPOINTMENT_EVENTS
      condition: "Appointment.serviceType.exists()"   # optional FHIRPath, must give true/false
      sources: [ehr]                    # optional; default: every source
    recipient: patient                  # each patient participant, address from Patient.telecom
    templates:
      subject: "Your appointment on {{ start | format_date }}"   # inline Jinja
      text: appointment-booked.txt      # file beside the mapping
      html: appointment-booked.html     # optional; autoescaped
    key: "{{ appointment.id }}|{{ event }}|{{ start }}|{{ patient_id }}"
    vars: {clinic_name: Example Clinic}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from connector.config import NAME_PATTERN

# Appointment events a mapping may trigger on: the R4 statuses an appointment can move to.
# entered-in-error is not among them: it withdraws, it never sends.
APPOINTMENT_EVENTS = frozenset(
    {"proposed", "pending", "booked", "arrived", "fulfilled", "cancelled", "noshow", "checked-in", "waitlist"}
)

DEFAULT_KEY = "{{ appointment.id }}|{{ event }}|{{ start }}|{{ patient_id }}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Trigger(_Strict):
    resource: Literal["Appointment"] = "Appointment"
    event: str
    condition: str | None = None
    sources: list[str] | None = None

    @field_validator("event")
    @classmethod
    def _known_event(cls, value: str) -> str:
        if value not in APPOINTMENT_EVENTS:
            known = ", ".join(sorted(APPOINTMENT_EVENTS))
            raise ValueError(f"unknown event {value!r}; Appointment events are: {known}")
        return value


class Templates(_Strict):
    subject: str = Field(min_length=1)
    text: str = Field(min_length=1, description="template file, relative to the mapping file")
    html: str | None = Field(None, description="template file, relative to the mapping file")


class MappingSpec(_Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str = ""
    trigger: Trigger
    recipient: Literal["patient"] = "patient"
    templates: Templates
    key: str = Field(DEFAULT_KEY, min_length=1)
    from_address: str | None = Field(None, alias="from")
    reply_to: str | None = None
    vars: dict[str, str | int | float | bool] = Field(default_factory=dict)
