"""The baseline: what a cron-style script around a Paubox client does, written here in a few lines of httpx.

    python -m bench.naive FHIR_URL PAUBOX_URL USERNAME COUNT      (the API key in PAUBOX_API_KEY)

It reads booked appointments page by page from the FHIR server, reads each one's patient, formats a
message with str.format and posts it to `/v1/<username>/messages`, one at a time, waiting for each answer,
until COUNT messages were accepted. One kept-alive connection per server (which favours it); no ledger, no
validation, no templates, no retries, no record of what was sent: a second run sends everything again.
It imports nothing from the connector, so its start-up, CPU and memory are those of such a script. It
prints one JSON line: {"sent": ..., "elapsed": ...}.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

TEXT = "Hello {name},\n\nyour appointment on {start} is booked.\n"
HTML = "<html><body><p>Hello {name},</p><p>your appointment on {start} is booked.</p></body></html>"


def appointments(fhir: httpx.Client) -> Iterator[dict[str, Any]]:
    url: str | None = "Appointment?status=booked&_count=50"
    while url:
        page = fhir.get(url).raise_for_status().json()
        for entry in page.get("entry", []):
            yield entry["resource"]
        url = next((link["url"] for link in page.get("link", []) if link.get("relation") == "next"), None)


def message(appointment: dict[str, Any], patient: dict[str, Any]) -> dict[str, Any]:
    name = " ".join([*patient["name"][0].get("given", []), patient["name"][0].get("family", "")])
    address = next(t["value"] for t in patient["telecom"] if t.get("system") == "email")
    fields = {"name": name, "start": appointment["start"]}
    html = base64.b64encode(HTML.format(**fields).encode()).decode()
    return {
        "data": {
            "message": {
                "recipients": [address],
                "headers": {
                    "subject": "Your appointment",
                    "from": "clinic@example.org",
                    "X-Notification-Key": f"naive:{appointment['id']}",
                },
                "content": {"text/plain": TEXT.format(**fields), "text/html": html},
            }
        }
    }


def main() -> None:
    fhir_url, paubox_url, username, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    headers = {"Authorization": f"Token token={os.environ['PAUBOX_API_KEY']}"}
    sent, started = 0, time.perf_counter()
    with (
        httpx.Client(base_url=fhir_url, timeout=30) as fhir,
        httpx.Client(base_url=f"{paubox_url}/v1/{username}/", headers=headers, timeout=30) as paubox,
    ):
        for appointment in appointments(fhir):
            if sent >= count:
                break
            actor = next(p["actor"]["reference"] for p in appointment["participant"] if "actor" in p)
            patient = fhir.get(actor).raise_for_status().json()
            answer = paubox.post("messages", json=message(appointment, patient))
            sent += answer.status_code == 200 and "sourceTrackingId" in answer.json()
    print(json.dumps({"sent": sent, "elapsed": time.perf_counter() - started}), flush=True)


if __name__ == "__main__":
    main()
