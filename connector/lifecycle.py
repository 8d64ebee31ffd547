"""Pure: what changed about an appointment, from its last seen state to the new one.

The ledger keeps one `Snapshot` per appointment (status, start, end, version, patient ids: no PHI).
`transitions(before, after)` compares two snapshots and names each real change once, however many
versions lay between two polls:

    first seen booked, or proposed/pending/waitlist/... → booked   booked
    start changed while booked                                    rescheduled (pending withdrawn, reminders re-armed)
    end alone changed while booked                                rescheduled, `changed` = {end}: nothing withdrawn;
                                                                  only mappings with `reschedule_on: [start, end]` speak
    → cancelled / noshow, or deleted while not cancelled          cancelled / noshow (pending withdrawn)
    → entered-in-error                                            entered-in-error (pending withdrawn, sends nothing)
    any other status change                                       that status (arrived, fulfilled, ...)
    a patient added to / removed from a booked appointment        booked for them / pending withdrawn for them
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from connector.fhir import parse_instant, patient_participants, reference_id

BOOKED = "booked"
RESCHEDULED = "rescheduled"
CANCELLED = "cancelled"
NOSHOW = "noshow"
ENTERED_IN_ERROR = "entered-in-error"
REMOVED = "removed"  # internal: a patient left a booked appointment (withdraws their pending mail)

# Events a mapping may trigger on.
APPOINTMENT_EVENTS = frozenset(
    {"proposed", "pending", BOOKED, RESCHEDULED, "arrived", "fulfilled", CANCELLED, NOSHOW, "checked-in", "waitlist"}
)
ENDED = frozenset({CANCELLED, NOSHOW, ENTERED_IN_ERROR})
TZ_CODE = "http://hl7.org/fhir/StructureDefinition/tz-code"


@dataclass(frozen=True)
class Snapshot:
    """What the connector remembers of an appointment between polls."""

    status: str
    start: datetime | None
    end: datetime | None
    version: str
    patients: tuple[str, ...]
    last_updated: datetime | None = None


@dataclass(frozen=True)
class Transition:
    event: str
    patients: tuple[str, ...]
    withdraw: bool = False  # cancel the pending notifications of these patients for this appointment
    deleted: bool = False
    changed: frozenset[str] = frozenset()  # rescheduled: which of "start", "end" changed (empty: unknown)

    @property
    def moves_start(self) -> bool:
        """A reschedule that moved the start (or one that does not say what changed)."""
        return not self.changed or "start" in self.changed


def snapshot(
    appointment: dict[str, Any], version: str, last_updated: datetime | None, base: str | None = None
) -> Snapshot:
    return Snapshot(
        status=str(appointment.get("status") or ""),
        start=parse_instant(appointment.get("start")),
        end=parse_instant(appointment.get("end")),
        version=version,
        patients=tuple(patient_participants(appointment, base)),
        last_updated=last_updated,
    )


def _merge(*groups: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for group in groups for p in group))


def transitions(before: Snapshot | None, after: Snapshot | None) -> list[Transition]:
    """The real changes from `before` (None: never seen) to `after` (None: deleted)."""
    if after is None:
        if before is None or before.status in ENDED:
            return []
        return [Transition(CANCELLED, before.patients, withdraw=True, deleted=True)]
    if before is None:
        if after.status == ENTERED_IN_ERROR:
            return []
        return [Transition(after.status, after.patients, withdraw=after.status in ENDED)]
    if after.status != before.status:
        everyone = _merge(before.patients, after.patients)
        if after.status in ENDED:
            return [Transition(after.status, everyone, withdraw=True)]
        if after.status == BOOKED:
            return [Transition(BOOKED, after.patients)]
        return [Transition(after.status, everyone, withdraw=before.status == BOOKED)]
    if after.status != BOOKED:
        return []
    changes: list[Transition] = []
    moved = after.start != before.start
    changed = frozenset(
        name for name, new, old in (("start", after.start, before.start), ("end", after.end, before.end)) if new != old
    )
    added = tuple(p for p in after.patients if p not in before.patients)
    removed = tuple(p for p in before.patients if p not in after.patients)
    if moved:
        changes.append(Transition(RESCHEDULED, after.patients, withdraw=True, changed=changed))
    elif changed:  # the end alone: remembered; the reminders stand (they count from the start)
        stayed = tuple(p for p in after.patients if p in before.patients)
        if stayed:
            changes.append(Transition(RESCHEDULED, stayed, changed=changed))
    if added and not moved:
        changes.append(Transition(BOOKED, added))
    if removed:
        changes.append(Transition(REMOVED, removed, withdraw=True))
    return changes


def is_stale(before: Snapshot | None, after: Snapshot) -> bool:
    """An older version than the one remembered (a lagging replica, an overlap re-read)."""
    if before is None or before.last_updated is None or after.last_updated is None:
        return False
    return after.last_updated < before.last_updated


def appointment_zone(appointment: dict[str, Any], location_zones: dict[str, str], default: str) -> str:
    """The appointment's IANA zone: tz-code extension on `start`, else its Location's zone, else default."""
    for extension in (appointment.get("_start") or {}).get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == TZ_CODE:
            code = extension.get("valueCode")
            if isinstance(code, str) and _known_zone(code):
                return code
    for participant in appointment.get("participant") or []:
        if not isinstance(participant, dict):
            continue
        location = reference_id((participant.get("actor") or {}).get("reference"), "Location")
        if location is not None and f"Location/{location}" in location_zones:
            return location_zones[f"Location/{location}"]
    return default


def _known_zone(code: str) -> bool:
    try:
        ZoneInfo(code)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def still_wanted(
    event: str, is_reminder: bool, planned_start: datetime | None, appointment: dict[str, Any], now: datetime
) -> str | None:
    """Why a notification planned earlier no longer fits the appointment as it is now (None: it fits).
    A safety net at send time: the poll that will see the change may not have run yet."""
    status = appointment.get("status")
    if status == ENTERED_IN_ERROR:
        return "the appointment was entered in error"
    if is_reminder or event in (BOOKED, RESCHEDULED):
        if status != BOOKED:
            return f"the appointment is now {status}"
        start = parse_instant(appointment.get("start"))
        if planned_start is not None and start != planned_start:
            return "the appointment moved to another time since this was planned"
        if start is not None and start <= now:
            return "the appointment has started"
    if event in (CANCELLED, NOSHOW) and status not in (CANCELLED, NOSHOW):
        return f"the appointment is {status} again"
    return None


def synthesized(appointment_id: str, before: Snapshot) -> dict[str, Any]:
    """A minimal Appointment from a remembered state, to announce a deletion (no PHI was kept)."""
    resource: dict[str, Any] = {
        "resourceType": "Appointment",
        "id": appointment_id,
        "status": "cancelled",
        "participant": [{"actor": {"reference": f"Patient/{p}"}, "status": "accepted"} for p in before.patients],
    }
    if before.start and before.end:
        resource["start"] = before.start.isoformat().replace("+00:00", "Z")
        resource["end"] = before.end.isoformat().replace("+00:00", "Z")
    return resource
