"""The benchmark's servers, each in its own process: the FHIR test server and the Paubox sandbox.

    python -m bench.servers fhir   [--appointments N] [--patients N] [--lifetime S]
    python -m bench.servers paubox [--latency-ms MS] [--per-message-ms MS] [--lifetime S]

Each serves the package's own sandbox app (`connector.testing`: uvicorn on 127.0.0.1, a free port), prints
one JSON line {"url": ...} on stdout once it accepts connections, and stops on SIGTERM, when its parent goes
away, or after --lifetime seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.testing import Server, appointment, patient, sandbox_state, serve_paubox

Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def bench_patient(index: int) -> dict[str, Any]:
    """A fictional patient who writes only to an example.org address."""
    return patient(f"bp{index}", "Pat", f"Bench{index}", email=f"patient{index}@example.org")


def bench_appointment(index: int, now: datetime) -> dict[str, Any]:
    """A booked appointment a few days ahead, for patient `index`."""
    start = now.replace(second=0, microsecond=0) + timedelta(days=3, minutes=index % 20_000)
    return appointment(f"ba{index}", f"bp{index}", start)


def counted(app: Asgi, state: FhirState) -> Asgi:
    """The FHIR app, plus `GET /_bench/requests` (how many requests it served, and this process's CPU seconds
    so far) and `DELETE` (the count starts again)."""

    async def wrapper(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/_bench/requests":
            await app(scope, receive, send)
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        body = json.dumps({"requests": len(state.requests), "cpu": usage.ru_utime + usage.ru_stime}).encode()
        if scope["method"] == "DELETE":
            state.requests.clear()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return wrapper


def serve(server: Server, lifetime: float) -> None:
    """Serve until SIGTERM, the parent's exit or `lifetime` seconds; print the URL once it listens."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    parent = os.getppid()
    with server:
        print(json.dumps({"url": server.url}), flush=True)
        deadline = time.monotonic() + lifetime
        while time.monotonic() < deadline and os.getppid() == parent and not stop.wait(0.2):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["fhir", "paubox"])
    parser.add_argument("--appointments", type=int, default=0, help="booked appointments (with their patients)")
    parser.add_argument("--patients", type=int, default=0, help="patients without appointments (bp0…)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="sandbox delay per send request")
    parser.add_argument("--per-message-ms", type=float, default=0.0, help="and per message it carries (bulk: each)")
    parser.add_argument("--lifetime", type=float, default=3600.0)
    args = parser.parse_args()
    if args.kind == "fhir":
        state = FhirState()
        now = datetime.now(UTC)
        for index in range(max(args.appointments, args.patients)):
            state.put(bench_patient(index))
        for index in range(args.appointments):
            state.put(bench_appointment(index, now))
        serve(Server(counted(fhir_app(state), state)), args.lifetime)
    else:
        charge = {"latency": args.latency_ms / 1000, "latency_per_message": args.per_message_ms / 1000}
        serve(serve_paubox(sandbox_state(**charge)), args.lifetime)


if __name__ == "__main__":
    main()
