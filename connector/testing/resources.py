"""FHIR resources for a test's world: fictional patients who write only to example.org addresses, and their
appointments. Nothing here is real patient data."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any


def instant(moment: datetime) -> str:
    """A FHIR instant, UTC written as `Z`."""
    return moment.isoformat().replace("+00:00", "Z")


def patient(pid: str, given: str, family: str = "Testperson", email: str | None = None, **extra: Any) -> dict[str, Any]:
    """A Patient with one official name and, when given, one home email; `extra` adds or replaces elements."""
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"use": "official", "given": [given], "family": family}],
    }
    if email:
        resource["telecom"] = [{"system": "email", "value": email, "use": "home"}]
    resource.update(extra)
    return resource


def appointment(aid: str, pid: str, start: datetime, status: str = "booked", **extra: Any) -> dict[str, Any]:
    """A 30-minute check-up of Patient `pid` at `start` (aware); `extra` adds or replaces elements."""
    resource: dict[str, Any] = {
        "resourceType": "Appointment",
        "id": aid,
        "status": status,
        "serviceType": [{"text": "Check-up"}],
        "start": instant(start),
        "end": instant(start + timedelta(minutes=30)),
        "participant": [{"actor": {"reference": f"Patient/{pid}"}, "required": "required", "status": "accepted"}],
    }
    resource.update(extra)
    return resource


def bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A collection Bundle of `resources` (what `connector sandbox fhir --data` loads)."""
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
