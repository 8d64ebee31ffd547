"""Pure: whether one resource version (or one CRM event) can be processed and recorded, and how to say why
not without its data.

Anything that goes wrong with one item (it is invalid, carries a modifier extension we do not understand,
names a patient by a malformed reference, holds an instant beyond the calendar in UTC, plans a key that
cannot be stored, or trips over anything unexpected) makes that item *quarantined*: recorded in the ledger
with the reason (seen_version.problem), counted, logged once, listed by `connector status` and the dry
runs. The page, the cursor and every other item move on; a new version of the resource is tried again.

Reasons name the error's type, where it was raised and which element, never a value: a ResourceError's text
is built from type, id, version and element paths; any other error is described by `logs.where`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from connector import fhir
from connector.errors import ConnectorError, ResourceError
from connector.ledger import SeenVersion
from connector.logs import safe_text, unsafe, where

if TYPE_CHECKING:
    from connector.models import PlannedNotification

APPOINTMENT_STATUSES = frozenset(
    {
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
    }
)
NO_ID = "(no id)"
MAX_PATIENT_IDS = 2000  # appointment_state.patients: the ids of an appointment's patients, space-separated
MAX_KEY = 512  # notification.key
MAX_REASON = 500


def reason(exc: BaseException, stage: str) -> str:
    """Why an item is quarantined, safe to log and store: a ConnectorError's own text (built without values),
    else the stage, the error's type and where it was raised (an exception's message may quote data)."""
    if isinstance(exc, ConnectorError):  # their texts are PHI-free by design (see connector.errors)
        return safe_text(str(exc), MAX_REASON)
    return safe_text(f"{stage} failed: {where(exc)}", MAX_REASON)


def seen_key(raw: Any) -> tuple[str, str, str]:
    """(type, id, version) of a page entry as the ledger records it, whatever the entry holds."""
    if not isinstance(raw, dict):
        return "?", NO_ID, fhir.version_of(raw)
    rid = raw.get("id")
    return safe_text(raw.get("resourceType", "?"), 64), safe_text(rid, 128) if rid else NO_ID, fhir.version_of(raw)


def later(a: datetime | None, b: datetime | None) -> datetime | None:
    """The later of two optional instants."""
    return b if a is None or (b is not None and b > a) else a


# -- checks ----------------------------------------------------------------------------------------------


def _check_instant(resource: dict[str, Any], element: str, value: Any) -> None:
    if value is None:
        return
    if fhir.in_utc(fhir.parse_instant(value)) is None:
        raise ResourceError(
            f"{fhir.describe(resource)}: {element} is not an instant the connector can compute "
            "with (it must be readable and fall within years 1-9999 in UTC)"
        )


def check_appointment(resource: dict[str, Any], base: str | None) -> None:
    """What fhir.validate does not check and processing relies on: a FHIR id, a status of the value set,
    no modifier extension, instants within the calendar, Patient references with valid ids."""
    label = fhir.describe(resource)
    if not isinstance(resource.get("id"), str) or not fhir.FHIR_ID.fullmatch(resource["id"]):
        raise ResourceError(f"{label}: id is not a FHIR id (1-64 of A-Z, a-z, 0-9, '-', '.')")
    if resource.get("status") not in APPOINTMENT_STATUSES:
        raise ResourceError(f"{label}: status is not a code of the AppointmentStatus value set")
    fhir.check_modifiers(resource)
    meta = resource["meta"] if isinstance(resource.get("meta"), dict) else {}
    for element, value in (
        ("start", resource.get("start")),
        ("end", resource.get("end")),
        ("meta.lastUpdated", meta.get("lastUpdated")),
    ):
        _check_instant(resource, f"Appointment.{element}", value)
    participants = resource.get("participant")
    for index, participant in enumerate(participants if isinstance(participants, list) else []):
        actor = participant.get("actor") if isinstance(participant, dict) else None
        reference = actor.get("reference") if isinstance(actor, dict) else None
        if not isinstance(reference, str):
            continue
        parts = fhir.reference_parts(reference, base)
        if unsafe(reference) or (parts is not None and parts[0] == "Patient" and not fhir.FHIR_ID.fullmatch(parts[1])):
            raise ResourceError(f"{label}: Appointment.participant[{index}].actor.reference is not a valid reference")


def _check_text(value: str, limit: int, what: str) -> None:
    if len(value) > limit or unsafe(value):
        raise ResourceError(f"{what} is longer than {limit} characters or holds control characters or invalid Unicode")


def check_storable(notifications: Iterable[PlannedNotification], patients: Iterable[str] = ()) -> None:
    """What the ledger will be given for one item fits its columns (a data error there would fail the
    transaction of a whole page): keys and ids of printable text within their lengths, times within the
    calendar in UTC, the remembered patient ids within their column."""
    if len(" ".join(patients)) > MAX_PATIENT_IDS:
        raise ResourceError(
            f"the appointment names more patients than the ledger remembers ({MAX_PATIENT_IDS} characters of ids)"
        )
    for n in notifications:
        what = f"mapping {n.mapping!r}: the notification key"
        _check_text(n.key, MAX_KEY, what)
        _check_text(n.patient_id, 128, f"mapping {n.mapping!r}: the patient id")
        _check_text(n.resource_version, 128, f"mapping {n.mapping!r}: the resource version")
        if fhir.in_utc(n.due_at) is None or (n.appointment_start and fhir.in_utc(n.appointment_start) is None):
            raise ResourceError(f"mapping {n.mapping!r}: a time is beyond the calendar in UTC")


# -- a page, examined ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """A valid Appointment version from a page."""

    resource: dict[str, Any]
    version: str
    last_updated: datetime | None


@dataclass
class Examined:
    valid: list[Seen] = field(default_factory=list)
    seen: list[SeenVersion] = field(default_factory=list)  # every version examined; problem set: quarantined
    newest: datetime | None = None


def triples(page: fhir.SearchPage) -> list[tuple[str, str, str]]:
    return [seen_key(raw) for raw in page.matches]


def examine(
    page: fhir.SearchPage, fresh: set[tuple[str, str, str]] | None, base: str | None = None, lean: bool = False
) -> Examined:
    """Validate and check a page's matches. `fresh` limits the result to versions not seen before (None: all).
    `lean`: validate only the elements the connector reads (connector.fhir_lean).
    The newest lastUpdated counts every Appointment, quarantined or not, so the cursor moves past them."""
    result = Examined()
    for raw in page.matches:
        updated = fhir.last_updated(raw) if isinstance(raw, dict) else None
        if updated is not None and raw.get("resourceType") == "Appointment":
            result.newest = later(result.newest, updated)
        triple = seen_key(raw)
        if fresh is not None and triple not in fresh:
            continue
        problem = None
        try:
            if triple[1] == NO_ID:
                raise ResourceError("a page entry has no resource id")
            if triple[0] != "Appointment":
                raise ResourceError(f"{fhir.describe(raw)} is not an Appointment")
            fhir.validate(raw, lean)
            check_appointment(raw, base)
        except Exception as exc:  # noqa: BLE001 - one bad version is quarantined, whatever went wrong
            problem = reason(exc, "validation")
        result.seen.append(SeenVersion(*triple, last_updated=updated, problem=problem))
        if problem is None:
            result.valid.append(Seen(raw, triple[2], updated))
    return result
