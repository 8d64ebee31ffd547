"""Pure: which event a version of an Appointment stands for.

The walking skeleton reads the event from the status of each new version: `booked`, `cancelled`, and
the other R4 statuses by name. Repeated versions with the same status give the same notification key,
so the ledger sends them once. `entered-in-error` gives no event: it must never send anything.
"""

from __future__ import annotations

from typing import Any

from connector.mapping.spec import APPOINTMENT_EVENTS


def appointment_events(appointment: dict[str, Any]) -> list[str]:
    status = appointment.get("status")
    return [status] if isinstance(status, str) and status in APPOINTMENT_EVENTS else []
