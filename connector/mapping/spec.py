"""The YAML mapping language: what a file in `mappings/` may say (README, "Mapping reference").

name: appointment-reminder-48h          # unique; defaults to the file name
description: Reminder two days before.
trigger:
  resource: Appointment
  event: booked                         # or a list: [cancelled, noshow]
  condition: "Appointment.serviceType.exists()"   # optional FHIRPath, must give true/false
  sources: [ehr]                        # optional; default: every source
at: start - 48h                         # optional; a reminder (or a list of offsets)
reschedule_on: [start]                  # rescheduled mappings: which changes count (default: config, [start])
late_grace: 2h                          # optional; send a reminder up to this late when first seen late
quiet_hours: true                       # respect the configured quiet hours (default true)
only_after_sent: true                   # cancellations/reschedules only if an email was sent before
recipient: patient
language: en                            # language of the base templates
templates:
  subject: "Reminder: {{ start | format_date }}"    # or {en: "...", nl: "..."}
  text: reminder.txt                    # variants beside it: reminder.nl.txt
  html: reminder.html                   # optional; autoescaped
key: "{{ appointment.id }}|{{ event }}|{{ start }}|{{ patient_id }}"
vars: {clinic_name: Example Clinic}
category: reminders                     # optional; what a patient may unsubscribe from (links:)
essential: false                        # true: sent despite the patient's own unsubscribe (transactional)
actions: [confirm, cancel]              # optional; links in the email: confirm_url, cancel_url
attach_ics: true                        # optional; an iCalendar file (add to calendar)
handoff: true                           # optional; false: never hand this mapping off; true or
                                        # {reasons: [...], owner: ..., category_optouts: ...}: hand it off
                                        # (over the config's handoff.mappings), overriding those keys
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from connector.config.handoff import OWNER_PATTERN, Reason
from connector.lifecycle import APPOINTMENT_EVENTS, BOOKED, CANCELLED, NOSHOW, RESCHEDULED
from connector.timing import parse_offset
from connector.units import NAME_PATTERN, Duration

DEFAULT_KEY = "{{ appointment.id }}|{{ event }}|{{ start }}|{{ patient_id }}"
ANNOUNCES_A_CHANGE = frozenset({CANCELLED, NOSHOW, RESCHEDULED})
LANGUAGE_PATTERN = r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Trigger(_Strict):
    # Appointment: a FHIR Appointment; CrmEvent: one CRM webhook event as it came; CrmAppointment: an
    # appointment a CRM source describes (`crm.<name>.appointment`), with the same lifecycle as FHIR's
    resource: Literal["Appointment", "CrmEvent", "CrmAppointment"] = "Appointment"
    event: list[str] = Field(min_length=1)
    condition: str | None = None
    sources: list[str] | None = None

    @field_validator("event", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("event")
    @classmethod
    def _known_events(cls, value: list[str], info: ValidationInfo) -> list[str]:
        unknown = [e for e in value if e not in APPOINTMENT_EVENTS]
        resource = info.data.get("resource", "Appointment")
        if resource in ("Appointment", "CrmAppointment") and unknown:
            known = ", ".join(sorted(APPOINTMENT_EVENTS))
            raise ValueError(f"unknown event {', '.join(map(repr, unknown))}; {resource} events are: {known}")
        return value


class RecipientPath(_Strict):
    """Where a CRM event carries the address: a FHIRPath on the event (FHIRPath reads plain JSON too),
    e.g. `payload.properties.email` or `payload.Email`. The first string that looks like an address wins."""

    path: str = Field(min_length=1)


class Templates(_Strict):
    subject: str | dict[Annotated[str, Field(pattern=LANGUAGE_PATTERN)], str]
    text: str = Field(min_length=1, description="template file, relative to the mapping file")
    html: str | None = Field(None, description="template file, relative to the mapping file")


class HandoffSpec(_Strict):
    """A mapping's own `handoff:`: `false` turns the hand-off off for it, `true` on (even when the config's
    `handoff.mappings` leaves it out, or there is no `handoff:` section: then a Task with every reason);
    the keys given override the config's `handoff:` for this mapping."""

    enabled: bool = True
    reasons: list[Reason] | None = Field(None, min_length=1)
    owner: Annotated[str, Field(pattern=OWNER_PATTERN)] | None = None
    category_optouts: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_the_configs(cls, value: object) -> object:
        if isinstance(value, dict):
            global_only = [k for k in ("to", "url", "secret", "mappings") if k in value]
            if global_only:
                raise ValueError(
                    f"{', '.join(global_only)}: set in the config's `handoff:` section; a mapping's `handoff:` "
                    "takes enabled, reasons, owner, category_optouts"
                )
        return value


class MappingSpec(_Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str = ""
    trigger: Trigger
    at: list[timedelta] | None = None
    reschedule_on: list[Literal["start", "end"]] | None = Field(None, min_length=1)
    late_grace: Duration | None = None
    quiet_hours: bool = True
    only_after_sent: bool | None = None
    fetch_object: bool = False  # CRM (HubSpot): read the event's object through the CRM API before sending
    recipient: Literal["patient"] | RecipientPath = "patient"
    language: Annotated[str, Field(pattern=LANGUAGE_PATTERN)] = "en"
    templates: Templates
    key: str = Field(DEFAULT_KEY, min_length=1)
    from_address: str | None = Field(None, alias="from")
    reply_to: str | None = None
    vars: dict[str, str | int | float | bool] = Field(default_factory=dict)
    category: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    essential: bool = False
    actions: list[Literal["confirm", "cancel"]] = Field(default_factory=list)
    attach_ics: bool = False
    handoff: HandoffSpec | None = None

    @field_validator("handoff", mode="before")
    @classmethod
    def _handoff_switch(cls, value: object) -> object:
        if isinstance(value, bool):
            return {"enabled": value}
        if value is not None and not isinstance(value, dict):
            raise ValueError("expected true, false, or hand-off keys (reasons, owner, category_optouts)")
        return value

    @field_validator("at", mode="before")
    @classmethod
    def _offsets(cls, value: object) -> object:
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise ValueError("expected an offset like `start - 48h`, or a list of them")
        offsets = [parse_offset(str(item)) for item in items]
        for item, offset in zip(items, offsets, strict=True):
            if offset > timedelta(0):
                before = str(item).replace("+", "-", 1).strip()
                raise ValueError(
                    f"{str(item).strip()!r} is after the appointment starts; a reminder before it is written "
                    f"`{' '.join(before.split())}` (`at` counts back from `start`)"
                )
        return offsets

    @model_validator(mode="after")
    def _coherent(self) -> MappingSpec:
        crm = self.trigger.resource == "CrmEvent"
        if crm and not isinstance(self.recipient, RecipientPath):
            raise ValueError("a CrmEvent mapping names where the address is: recipient: {path: payload.email}")
        if self.trigger.resource == "Appointment" and self.recipient != "patient":
            raise ValueError("an Appointment mapping writes to its patients: recipient: patient")
        if crm and self.at is not None:
            raise ValueError(
                "`at:` (reminders) applies to Appointment and CrmAppointment mappings: for reminders of CRM "
                "bookings describe the appointment under crm.<name>.appointment and use resource: CrmAppointment"
            )
        if self.fetch_object and not crm:
            raise ValueError(
                "`fetch_object` applies to CrmEvent mappings only (CrmAppointment: crm.<name>.appointment.fetch_object)"
            )
        if self.reschedule_on is not None and RESCHEDULED not in self.trigger.event:
            raise ValueError("`reschedule_on` applies to mappings triggered on `rescheduled`")
        if self.at is not None and self.trigger.event != [BOOKED]:
            raise ValueError("a reminder (`at:`) is armed while the appointment is booked: use `event: booked`")
        if crm and (self.actions or self.attach_ics):
            raise ValueError("`actions` and `attach_ics` apply to Appointment mappings only")
        if self.actions and self.trigger.event != [BOOKED] and RESCHEDULED not in self.trigger.event:
            raise ValueError("`actions` (confirm, cancel) go in emails about a booked or rescheduled appointment")
        if isinstance(self.templates.subject, dict) and self.language not in self.templates.subject:
            raise ValueError(f"templates.subject has no entry for the mapping's language {self.language!r}")
        return self

    @property
    def is_reminder(self) -> bool:
        return self.at is not None

    @property
    def is_crm(self) -> bool:
        """Triggered by one CRM webhook event as it came (not by a CRM appointment's lifecycle)."""
        return self.trigger.resource == "CrmEvent"

    @property
    def is_crm_appointment(self) -> bool:
        return self.trigger.resource == "CrmAppointment"

    @property
    def needs_prior_email(self) -> bool:
        """Only announce a change to someone who was told about the appointment (default for changes)."""
        if self.only_after_sent is not None:
            return self.only_after_sent
        return not self.is_crm and any(event in ANNOUNCES_A_CHANGE for event in self.trigger.event)
