"""Demo data for `connector sandbox fhir`: the bundled HL7 R4 examples plus generated appointments.

The generated patients are fictional and write only to example.org addresses. Appointment times are set
relative to the moment the server starts, so the demo always has upcoming appointments.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from importlib import resources
from typing import Any

PATIENTS: list[tuple[str, str, str, list[tuple[str, str, int | None]]]] = [
    ("demo-p1", "Alex", "Rivera", [("alex.rivera@example.org", "home", None)]),
    (
        "demo-p2",
        "Samira",
        "Okafor",
        [("s.okafor.old@example.org", "old", None), ("samira.okafor@example.org", "home", 1)],
    ),
    ("demo-p3", "Jonas", "Lindqvist", [("jonas.lindqvist@example.org", "work", None)]),
    ("demo-p4", "Priya", "Raman", []),  # no email address: the notification is skipped
]

# (appointment id, patient id, days from now, hour, status, service)
APPOINTMENTS = [
    ("demo-a1", "demo-p1", 2, 9, "booked", "General check-up"),
    ("demo-a2", "demo-p2", 3, 14, "booked", "Physiotherapy"),
    ("demo-a3", "demo-p3", 5, 11, "cancelled", "Dermatology consultation"),
    ("demo-a4", "demo-p4", 4, 10, "booked", "Vaccination"),
    ("demo-a5", "demo-p1", 9, 16, "proposed", "Follow-up visit"),
]


def hl7_examples() -> list[dict[str, Any]]:
    folder = resources.files("connector.sandbox") / "data" / "hl7"
    return [
        json.loads(f.read_text(encoding="utf-8"))
        for f in sorted(folder.iterdir(), key=lambda f: f.name)
        if f.name.endswith(".json")
    ]


def patient(pid: str, given: str, family: str, emails: list[tuple[str, str, int | None]]) -> dict[str, Any]:
    telecom: list[dict[str, Any]] = [{"system": "phone", "value": "+1 555 0199", "use": "mobile"}]
    for value, use, rank in emails:
        entry: dict[str, Any] = {"system": "email", "value": value, "use": use}
        if rank is not None:
            entry["rank"] = rank
        telecom.append(entry)
    return {
        "resourceType": "Patient",
        "id": pid,
        "active": True,
        "name": [{"use": "official", "family": family, "given": [given]}],
        "telecom": telecom,
        "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en"}]}, "preferred": True}],
    }


def appointment(aid: str, pid: str, start: datetime, status: str, service: str, minutes: int = 30) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Appointment",
        "id": aid,
        "status": status,
        "serviceType": [{"text": service}],
        "description": service,
        "participant": [
            {"actor": {"reference": f"Patient/{pid}"}, "required": "required", "status": "accepted"},
            {
                "actor": {"reference": "Practitioner/example", "display": "Dr Adam Careful"},
                "required": "required",
                "status": "accepted",
            },
        ],
    }
    if status != "proposed":
        resource["start"] = start.isoformat().replace("+00:00", "Z")
        resource["end"] = (start + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")
    return resource


def generated(now: datetime) -> list[dict[str, Any]]:
    """Fictional patients and their appointments, starting a few days after `now`."""
    day = now.replace(minute=0, second=0, microsecond=0)
    result = [patient(*p) for p in PATIENTS]
    for aid, pid, days, hour, status, service in APPOINTMENTS:
        start = (day + timedelta(days=days)).replace(hour=hour, minute=30)
        result.append(appointment(aid, pid, start, status, service))
    return result


def demo_resources(now: datetime) -> list[dict[str, Any]]:
    return [*hl7_examples(), *generated(now)]
