"""What runs in the benchmark's worker processes, one process per measurement (clean CPU and RSS figures).

    python -m bench.workers pipeline SPEC_JSON   one run_once over everything on the FHIR server
    python -m bench.workers resync   SPEC_JSON   a first poll of everything, then a bounded slice of dispatch
    python -m bench.workers latency  SPEC_JSON   run_once every `interval` while appointments arrive
    python -m bench.workers naive    SPEC_JSON   one POST /messages at a time, synchronously

Each prints one JSON line of results on stdout (the latency worker first prints "ready"). The connector's
logs (product default: info, console) go to stderr, which the benchmark sends to a file. The worker reads
the config the benchmark wrote (bench/rig.py) and imports only the connector's public API, not the test
harness: its memory figures are the connector's.
"""

from __future__ import annotations

import asyncio
import cProfile
import itertools
import json
import os
import pstats
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from connector import logs
from connector.config import load_config
from connector.daemon import run_once
from connector.delivery import Outcome, Verdict
from connector.delivery.paubox import build_payload
from connector.models import Email, State
from connector.runtime import Runtime

TICK = os.sysconf("SC_CLK_TCK")


def now() -> datetime:
    return datetime.now(UTC)


# -- measuring the process ---------------------------------------------------------------------------


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmHWM: peak resident set; VmRSS: current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def thread_cpu(native_id: int | None) -> float:
    """CPU seconds (user + system) of one thread of this process, from /proc."""
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of stat)


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ledger_thread_cpu() -> float:
    """CPU of asyncio's default executor threads. Every asyncio.to_thread call in the connector is a
    ledger call, so this is the CPU the ledger (SQLAlchemy + sqlite3) used."""
    return sum(thread_cpu(t.native_id) for t in threading.enumerate() if t.name.startswith("asyncio_"))


# -- the connector, configured for a run (bench/rig.py wrote its config) -----------------------


class InstantMailer:
    """A mailer that accepts every message at once (for the resync RSS run: no network)."""

    def __init__(self) -> None:
        self._ids = itertools.count()

    async def send(self, email: Email) -> Outcome:
        return Outcome(Verdict.SENT, "accepted", tracking_id=f"instant-{next(self._ids)}")

    async def send_many(self, emails: list[Email]) -> list[Outcome]:
        return [await self.send(e) for e in emails]

    async def aclose(self) -> None:
        return None


def open_runtime(spec: dict[str, Any]) -> Runtime:
    os.environ["PAUBOX_API_KEY"] = spec["api_key"]
    logs.configure("info", "console")  # the product default, on stderr
    config = load_config(Path(spec["config"]))
    return Runtime.open(config, now, mailer=InstantMailer() if spec.get("instant") else None)


# -- roles ------------------------------------------------------------------------------------------


class Profiles:
    """cProfile in the event loop's thread and in each of asyncio's executor threads (the ledger's), timed
    in thread CPU time: wall time would charge the ledger threads for waiting on the GIL."""

    def __init__(self) -> None:
        self.main = cProfile.Profile(time.thread_time)
        self.threads: list[cProfile.Profile] = []
        self.executor = ThreadPoolExecutor(thread_name_prefix="asyncio", initializer=self._start_thread)

    def _start_thread(self) -> None:
        profile = cProfile.Profile(time.thread_time)
        self.threads.append(profile)
        profile.enable()

    def dump(self, prefix: str) -> None:
        self.main.disable()
        self.executor.shutdown(wait=True)  # the threads end, and with them their profilers
        self.main.dump_stats(prefix + "main.pstats")
        if self.threads:
            pstats.Stats(*self.threads).dump_stats(prefix + "ledger.pstats")


async def pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """One run_once over everything the FHIR server holds: poll + plan + ledger + dispatch."""
    profiles = Profiles() if spec.get("profile") else None
    if profiles is not None:
        asyncio.get_running_loop().set_default_executor(profiles.executor)
    rss_before = status_kb("VmRSS")
    runtime = open_runtime(spec)
    rss_open = status_kb("VmRSS")
    wall0, cpu0, t0 = time.time(), process_cpu(), time.perf_counter()
    if profiles is not None:
        profiles.main.enable()
    report = await run_once(runtime)
    elapsed = time.perf_counter() - t0
    if profiles is not None:
        profiles.main.disable()
    cpu, ledger_cpu = process_cpu() - cpu0, ledger_thread_cpu()
    counts = {state.value: n for state, n in runtime.ledger.reports.counts().items() if n}
    await runtime.aclose()
    if profiles is not None:
        profiles.dump(spec["profile"])
    return {
        "elapsed": elapsed,
        "started_at": wall0,
        "cpu": cpu,
        "ledger_cpu": ledger_cpu,
        "sent": counts.get(State.SENT.value, 0),
        "counts": counts,
        "resources": sum(p.resources for p in report.polls),
        "pages": sum(p.pages for p in report.polls),
        "poll_errors": [p.error for p in report.polls if p.error],
        "rss_before_kb": rss_before,
        "rss_open_kb": rss_open,
        "peak_rss_kb": status_kb("VmHWM"),
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


async def resync(spec: dict[str, Any]) -> dict[str, Any]:
    """A first poll of everything (poll + plan + commit), then `dispatch_seconds` of sending through a mailer
    that accepts at once; stopped as the daemon stops (dispatcher.stopping), after the batch in hand."""
    runtime = open_runtime(spec)
    rss_open = status_kb("VmRSS")
    t0 = time.perf_counter()
    polled = await runtime.poller.poll("ehr")
    poll_seconds, rss_poll = time.perf_counter() - t0, status_kb("VmHWM")
    sent, dispatch_seconds = 0, 0.0
    if spec["dispatch_seconds"] > 0:
        stop = asyncio.get_running_loop().call_later(
            spec["dispatch_seconds"], lambda: setattr(runtime.dispatcher, "stopping", True)
        )
        t1 = time.perf_counter()
        report = await runtime.dispatcher.run()
        dispatch_seconds, sent = time.perf_counter() - t1, report.sent
        stop.cancel()
    counts = {state.value: n for state, n in runtime.ledger.reports.counts().items() if n}
    await runtime.aclose()
    return {
        "poll_seconds": poll_seconds,
        "resources": polled.resources,
        "pages": polled.pages,
        "planned": polled.inserted,
        "poll_error": polled.error,
        "dispatch_seconds": dispatch_seconds,
        "sent": sent,
        "counts": counts,
        "rss_open_kb": rss_open,
        "peak_rss_poll_kb": rss_poll,
        "peak_rss_kb": status_kb("VmHWM"),
    }


async def latency(spec: dict[str, Any]) -> dict[str, Any]:
    """A daemon-like loop: run_once, then sleep out the rest of `interval`; until `expected` notifications
    were sent or `duration + drain` seconds have passed (bounded in count and time)."""
    runtime = open_runtime(spec)
    await run_once(runtime)  # the first poll (nothing there yet) sets the cursor
    print("ready", flush=True)
    interval, deadline = spec["interval"], time.monotonic() + spec["duration"] + spec["drain"]
    sent, cycles, longest, busy = 0, 0, 0.0, 0.0
    max_cycles = int((spec["duration"] + spec["drain"]) / interval) + 10
    while time.monotonic() < deadline and cycles < max_cycles and sent < spec["expected"]:
        start = time.monotonic()
        report = await run_once(runtime)
        took = time.monotonic() - start
        cycles, busy, longest = cycles + 1, busy + took, max(longest, took)
        sent += report.dispatch.sent if report.dispatch else 0
        await asyncio.sleep(max(0.0, interval - took))
    counts = {state.value: n for state, n in runtime.ledger.reports.counts().items() if n}
    await runtime.aclose()
    return {
        "sent": sent,
        "counts": counts,
        "cycles": cycles,
        "longest_cycle": longest,
        "mean_cycle": busy / cycles if cycles else 0.0,
        "peak_rss_kb": status_kb("VmHWM"),
    }


def naive(spec: dict[str, Any]) -> dict[str, Any]:
    """What a script around an official SDK does: for each message, one POST, wait for the answer."""
    samples = json.loads(Path(spec["samples"]).read_text())
    emails = [
        Email(
            notification_key=f"naive-{i}",
            to=m["recipients"][0],
            from_address=m["from"],
            subject=m["subject"],
            text=m["text"],
            html=m["html"],
        )
        for i, m in zip(range(spec["count"]), itertools.cycle(samples), strict=False)
    ]
    headers = {"Authorization": f"Token token={spec['api_key']}", "Accept": "application/json"}
    accepted = 0
    with httpx.Client(base_url=f"{spec['paubox']}/v1/{spec['username']}/", headers=headers, timeout=30) as client:
        t0 = time.perf_counter()
        for email in emails:
            response = client.post("messages", json=build_payload(email))
            accepted += response.status_code == 200 and "sourceTrackingId" in response.json()
        elapsed = time.perf_counter() - t0
    return {"elapsed": elapsed, "sent": accepted, "count": len(emails)}


def main() -> None:
    role, spec = sys.argv[1], json.loads(sys.argv[2])
    if role == "naive":
        result = naive(spec)
    else:
        result = asyncio.run({"pipeline": pipeline, "resync": resync, "latency": latency}[role](spec))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
