"""What a patient's click does (connector.web.links hands each verified POST here): confirm or cancel an
appointment, written back to the EHR, or unsubscribe.

- **confirm** creates an `AppointmentResponse` (`participantStatus: accepted`); the Appointment is not changed.
- **cancel** creates one with `declined` and, where the source allows it (`write_back.cancel_appointment`),
  sets the Appointment to `cancelled` with `cancelationReason` `pat-crs` (HL7 appointment-cancellation-reason):
  an update naming the version it was decided on (`If-Match`); a 412 reads again and decides again, never a
  blind overwrite. The connector's next poll sees the cancellation and follows the normal lifecycle.
- **unsubscribe** adds the address the email went to to the opt-out list, for the mapping's category (or
  every email), with origin `link`, and withdraws the patient's pending notifications of that category: from
  the ledger alone (the address's keyed digest was recorded when the email was prepared), never the EHR.

Every write is a conditional create on an identifier derived from the email and the action
(`links.write_identifier`): a double click, a retry or a second replica finds the first and writes nothing
new, and answers like the first. An action on an appointment that has started, was cancelled or was moved
since the email (superseded) writes nothing and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog

from connector import fhir, links
from connector.errors import SourceError
from connector.sources.fhir_write import FhirWriter, StaleVersion, WriteRefused

if TYPE_CHECKING:
    from connector.config import Config
    from connector.ledger import NotificationRecord
    from connector.ledger.abc import PatientLinks
    from connector.mapping.loader import MappingSet
    from connector.sources.fhir_poll import FhirPollSource

log = structlog.get_logger("connector.actions")

IDENTIFIER_SYSTEM = "urn:connector:patient-action"
CANCELLATION_REASONS = "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason"
PAT_CRS = {
    "system": CANCELLATION_REASONS,
    "code": "pat-crs",
    "display": "Patient: Canceled via automated reminder system",
}
UPDATE_TRIES = 3
FORGET_EVERY = timedelta(hours=1)


class Outcome(StrEnum):
    DONE = "done"  # confirmed, cancelled or unsubscribed (now or by an earlier click)
    STARTED = "started"  # the appointment has started or is over: nothing written
    CANCELLED = "cancelled"  # it was cancelled (not by this link): nothing written
    SUPERSEDED = "superseded"  # it was moved since the email: nothing written
    GONE = "gone"  # the notification or the appointment is no longer there
    NOT_OFFERED = "not_offered"  # the source does not take write-back
    UNAVAILABLE = "unavailable"  # the EHR did not answer or refused: nothing known to be written


@dataclass(frozen=True)
class Page:
    """What a link's page shows (no patient data): the clinic, the appointment's start, the category."""

    clinic: str
    start: datetime | None
    category: str | None


class PatientActions:
    def __init__(
        self,
        config: Config,
        sources: dict[str, FhirPollSource],
        mappings: MappingSet,
        ledger: PatientLinks,
    ) -> None:
        self.config = config
        self.sources = sources
        self.mappings = mappings
        self.ledger = ledger
        self._forgot_at: datetime | None = None
        self.writers = {name: FhirWriter(source) for name, source in sources.items()}

    async def forget(self, now: datetime) -> int:
        """At most hourly: drop where emails went once their unsubscribe links have expired (`links.ttl`)."""
        if self.config.links is None or (self._forgot_at is not None and now - self._forgot_at < FORGET_EVERY):
            return 0
        self._forgot_at = now
        forgotten = await self.ledger.forget(now - self.config.links.ttl - FORGET_EVERY)
        if forgotten:
            log.info("link.recipients_forgotten", count=forgotten)
        return forgotten

    async def notification(self, notification_id: int) -> NotificationRecord | None:
        return await self.ledger.notification(notification_id)

    def page(self, record: NotificationRecord) -> Page:
        mapping = self.mappings.get(record.mapping)
        clinic = str((mapping.spec.vars.get("clinic_name") if mapping else None) or "")
        if not clinic and self.config.links is not None:
            clinic = self.config.links.clinic_name
        return Page(clinic, record.appointment_start, mapping.spec.category if mapping else None)

    async def respond(self, record: NotificationRecord, action: str, now: datetime) -> Outcome:
        """Confirm (`accepted`) or cancel (`declined`, and the Appointment cancelled where allowed)."""
        source = self.sources.get(record.source)
        writer = self.writers.get(record.source)
        if source is None or writer is None or not source.config.write_back.responses:
            return Outcome.NOT_OFFERED
        identifier = links.write_identifier(record.key, action)
        try:
            if not await _writes_once(writer, source.config.write_back.cancel_appointment and action == "cancel"):
                return Outcome.NOT_OFFERED
            current = await writer.read("Appointment", record.resource_id)
            if current is None:
                return Outcome.GONE
            ours = action == "cancel" and _cancelled_by_patient(current.resource)
            refusal = _refusal(record, current.resource, now, cancelled_by_patient=ours)
            if refusal is not None:
                return refusal
            changes = action == "cancel" and source.config.write_back.cancel_appointment
            if changes and not ours and current.version is None:
                return _unversioned(writer)
            await writer.create(
                _response(record, identifier, "accepted" if action == "confirm" else "declined"),
                if_none_exist=f"identifier={IDENTIFIER_SYSTEM}|{identifier}",
                what=f"{action} (AppointmentResponse)",
            )
            if action == "cancel" and source.config.write_back.cancel_appointment:
                return await self._cancel(writer, record, now)
        except WriteRefused as exc:
            log.warning("link.refused", source=record.source, action=action, status=exc.status)
            return Outcome.UNAVAILABLE
        except SourceError as exc:
            log.warning("link.unavailable", source=record.source, action=action, problem=type(exc).__name__)
            return Outcome.UNAVAILABLE
        return Outcome.DONE

    async def _cancel(self, writer: FhirWriter, record: NotificationRecord, now: datetime) -> Outcome:
        for _ in range(UPDATE_TRIES):
            current = await writer.read("Appointment", record.resource_id)
            if current is None:
                return Outcome.GONE
            if _cancelled_by_patient(current.resource):
                return Outcome.DONE
            refusal = _refusal(record, current.resource, now)
            if refusal is not None:
                return refusal
            if current.version is None:  # an update without If-Match would overwrite blindly
                return _unversioned(writer)
            changed = {**current.resource, "status": "cancelled", "cancelationReason": {"coding": [PAT_CRS]}}
            try:
                await writer.update(changed, version=current.version, what="cancel (Appointment)")
            except StaleVersion:
                continue  # changed meanwhile: read it again and decide again
            return Outcome.DONE
        return Outcome.UNAVAILABLE

    async def unsubscribe(self, record: NotificationRecord, everything: bool, now: datetime) -> Outcome:
        """Opt the address the email went to out of the mapping's category (or of every email) and withdraw
        what is pending. Only the ledger is used: the keyed digest of the address was recorded when the email
        was prepared, so an EHR that does not answer loses no unsubscribe."""
        mapping = self.mappings.get(record.mapping)
        category = "" if everything or mapping is None or mapping.spec.category is None else mapping.spec.category
        # A CRM email names no patient: nothing to withdraw by patient (the opt-out stops its later emails
        # when they are prepared).
        names = [
            m.name
            for m in self.mappings
            if record.patient_id
            and not m.spec.essential
            and not m.spec.is_crm
            and (category == "" or m.spec.category == category)
        ]
        keys = self.config.optout.keys if self.config.optout is not None else {}
        added, withdrawn = await self.ledger.unsubscribe(
            record.id,
            category,
            names,
            f"the patient unsubscribed ({category or 'every email'})",
            now,
            set(keys),
        )
        log.info("link.unsubscribed", source=record.source, category=category or "*", added=added, withdrawn=withdrawn)
        return Outcome.DONE


async def _writes_once(writer: FhirWriter, update: bool) -> bool:
    """Whether the server promises one write per intent: conditional creates of AppointmentResponse (and
    version-aware updates of Appointment when a cancel changes it). Without, write-back is refused, logged
    once per click, rather than risking duplicates in the chart."""
    capabilities = await writer.capabilities()
    missing = [
        what
        for what, ok in (
            ("conditional create of AppointmentResponse", "AppointmentResponse" in capabilities.conditional_create),
            ("versioned update of Appointment", not update or "Appointment" in capabilities.versioned_update),
        )
        if not ok
    ]
    if missing:
        log.warning("link.write_back_refused", source=writer.name, problem=f"the server does not offer {missing[0]}")
    return not missing


def _unversioned(writer: FhirWriter) -> Outcome:
    log.warning("link.write_back_refused", source=writer.name, problem="the Appointment was read without a version")
    return Outcome.UNAVAILABLE


def _refusal(
    record: NotificationRecord, appointment: dict[str, Any], now: datetime, cancelled_by_patient: bool = False
) -> Outcome | None:
    """Why this email's action must not be written now (None: it may). An appointment a patient's link
    cancelled (`cancelled_by_patient`) lets this email's cancel answer like the first, unless it was moved
    since this email."""
    if cancelled_by_patient:
        start = fhir.parse_instant(appointment.get("start"))
        moved = record.appointment_start is not None and start != record.appointment_start
        return Outcome.SUPERSEDED if moved else None
    if appointment.get("status") in ("cancelled", "noshow", "entered-in-error"):
        return Outcome.CANCELLED
    start = fhir.parse_instant(appointment.get("start"))
    if start is None or start <= now or appointment.get("status") in ("arrived", "fulfilled", "checked-in"):
        return Outcome.STARTED
    if record.appointment_start is not None and start != record.appointment_start:
        return Outcome.SUPERSEDED
    return None


def _cancelled_by_patient(appointment: dict[str, Any]) -> bool:
    reason = appointment.get("cancelationReason")
    codings = reason.get("coding") if isinstance(reason, dict) else None
    return appointment.get("status") == "cancelled" and any(
        isinstance(c, dict) and c.get("code") == "pat-crs" and c.get("system") == CANCELLATION_REASONS
        for c in codings or []
    )


def _response(record: NotificationRecord, identifier: str, status: str) -> dict[str, Any]:
    return {
        "resourceType": "AppointmentResponse",
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": identifier}],
        "appointment": {"reference": f"Appointment/{record.resource_id}"},
        "actor": {"reference": f"Patient/{record.patient_id}"},
        "participantStatus": status,
    }
