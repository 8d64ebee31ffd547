"""Resources for tests. Patient names and addresses double as PHI markers: no log line may contain them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connector.models import PlannedNotification, State
from connector.testing import appointment, patient

__all__ = ["MARKER_NAMES", "NOW", "appointment", "hl7", "marker_patients", "patient", "planned"]

FIXTURES = Path(__file__).with_name("fixtures")

MARKER_NAMES = ["Zebulon", "Quixotica", "Marmaduke", "Ottoline"]


def hl7(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def marker_patients() -> list[dict[str, Any]]:
    return [
        patient(f"p{i}", name, f"{name}son", email=f"{name.lower()}.{i}@example.org")
        for i, name in enumerate(MARKER_NAMES, start=1)
    ]


NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def planned(key: str, due: datetime = NOW, state: State = State.PENDING) -> PlannedNotification:
    """A notification as intake plans it, keyed `key` (also its resource id), for the ledger's contract."""
    return PlannedNotification(
        key=key,
        source="ehr",
        mapping="m",
        event="booked",
        resource_type="Appointment",
        resource_id=key,
        resource_version="1",
        patient_id="p1",
        due_at=due,
        state=state,
    )
