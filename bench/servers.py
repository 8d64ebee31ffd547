"""The benchmark's servers, each in its own process: the FHIR test server and the Paubox sandbox.

    python bench/servers.py fhir   [--appointments N] [--patients N] [--lifetime S]
    python bench/servers.py paubox [--latency-ms MS] [--lifetime S]

Each serves the package's own sandbox app with uvicorn on 127.0.0.1 (a free port), prints one JSON line
{"url": ...} on stdout once it accepts connections, and stops on SIGTERM, when its parent goes away, or
after --lifetime seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import uvicorn

from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app

API_KEY = "bench-sandbox-key"
USERNAME = "clinic"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def instant(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def patient(index: int) -> dict[str, Any]:
    """A fictional patient who writes only to an example.org address."""
    return {
        "resourceType": "Patient",
        "id": f"bp{index}",
        "name": [{"use": "official", "given": ["Pat"], "family": f"Bench{index}"}],
        "telecom": [{"system": "email", "value": f"patient{index}@example.org", "use": "home"}],
    }


def appointment(index: int, now: datetime) -> dict[str, Any]:
    """A booked appointment a few days ahead, for patient `index`."""
    start = now.replace(second=0, microsecond=0) + timedelta(days=3, minutes=index % 20_000)
    return {
        "resourceType": "Appointment",
        "id": f"ba{index}",
        "status": "booked",
        "serviceType": [{"text": "Check-up"}],
        "start": instant(start),
        "end": instant(start + timedelta(minutes=30)),
        "participant": [{"actor": {"reference": f"Patient/bp{index}"}, "required": "required", "status": "accepted"}],
    }


def serve(app: Any, lifetime: float) -> None:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False, lifespan="off")
    )
    parent = os.getppid()

    def watch() -> None:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        print(json.dumps({"url": f"http://127.0.0.1:{port}"}), flush=True)
        end = time.monotonic() + lifetime
        while time.monotonic() < end and os.getppid() == parent and not server.should_exit:
            time.sleep(0.2)
        server.should_exit = True

    threading.Thread(target=watch, daemon=True).start()
    server.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["fhir", "paubox"])
    parser.add_argument("--appointments", type=int, default=0, help="booked appointments (with their patients)")
    parser.add_argument("--patients", type=int, default=0, help="patients without appointments (bp0…)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="sandbox delay per send request")
    parser.add_argument("--lifetime", type=float, default=3600.0)
    args = parser.parse_args()
    if args.kind == "fhir":
        state = FhirState()
        now = datetime.now(UTC)
        for index in range(max(args.appointments, args.patients)):
            state.put(patient(index))
        for index in range(args.appointments):
            state.put(appointment(index, now))
        serve(fhir_app(state), args.lifetime)
    else:
        serve(
            paubox_app(SandboxState(api_key=API_KEY, username=USERNAME, latency=args.latency_ms / 1000)), args.lifetime
        )
    sys.exit(0)


if __name__ == "__main__":
    main()
