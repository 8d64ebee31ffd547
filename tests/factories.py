"""Resources for tests. Patient names and addresses double as PHI markers: no log line may contain them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from connector.testing import appointment, patient

__all__ = ["MARKER_NAMES", "appointment", "hl7", "marker_patients", "patient"]

FIXTURES = Path(__file__).with_name("fixtures")

MARKER_NAMES = ["Zebulon", "Quixotica", "Marmaduke", "Ottoline"]


def hl7(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def marker_patients() -> list[dict[str, Any]]:
    return [
        patient(f"p{i}", name, f"{name}son", email=f"{name.lower()}.{i}@example.org")
        for i, name in enumerate(MARKER_NAMES, start=1)
    ]
