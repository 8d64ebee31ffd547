"""Latency with Subscriptions: a `connector run` daemon (the product's defaults, a rest-hook Subscription on
the FHIR test server) while appointments are written at a steady rate; latency = the sandbox's received_at
minus the appointment's meta.lastUpdated, both from this machine's clock. The sweeps the daemon ran meanwhile
(its `poll.done` log lines with `sweep=True`: when each ended and how long it took) split the figures: the
appointments written while a sweep re-read the overlap, and the others."""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from bench.rig import Rig, sandbox
from bench.table import Report, log, percentile
from connector.testing import API_KEY, HarnessError, cli, daemon, environment, free_port

if TYPE_CHECKING:
    from collections.abc import Callable

SECRET = "bench-subscription-secret"  # noqa: S105 - made up; the FHIR test server sends it back to us
SWEEP = re.compile(r"^(\S+) .*poll\.done .*\bseconds=([0-9.]+)\b.*\bsweep=True")

Sweep = tuple[datetime, datetime]  # (began, ended)


def sweeps(daemon_log: Path) -> list[Sweep]:
    """The sweeps in a daemon's log (console format, times in UTC)."""
    found = []
    for line in daemon_log.read_text(errors="replace").splitlines():
        if match := SWEEP.match(line):
            ended = datetime.fromisoformat(match[1].replace("Z", "+00:00"))
            found.append((ended - timedelta(seconds=float(match[2])), ended))
    return found


def subscription_latency(
    rig: Rig, count: int, rate: float, feed: Callable[[str, int, float], tuple[dict[str, datetime], float]]
) -> tuple[list[tuple[datetime, float]], int, float, list[Sweep]]:
    """(written, latency in ms) of `count` appointments written at `rate`/s with a rest-hook Subscription
    (id-only), and the sweeps the daemon ran."""
    process, fhir = rig.procs.server("fhir", "--patients", str(count))
    folder = rig.root / "subscription"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/fhir/ehr/notify"
    subscription = (
        "    subscription:\n      enabled: true\n      kind: rest-hook\n      secret: ${SUB_SECRET}\n"
        f"      endpoint: {endpoint}\n      criteria: Appointment?status=booked\n      payload: id-only\n"
    )
    config = rig.default_config(folder, fhir, extra_source=subscription, server={"host": "127.0.0.1", "port": port})
    env = environment(PAUBOX_API_KEY=API_KEY, SUB_SECRET=SECRET)
    try:
        cli("db", "upgrade", "--config", config, cwd=folder, env=env)
        cli("subscribe", "ehr", "--config", config, cwd=folder, env=env)
        sandbox(rig.paubox, "DELETE", "/_sandbox/messages")
        with daemon(config, cwd=folder, env=env, log_name="subscribed-daemon.log") as child:
            child.wait_http(f"http://127.0.0.1:{port}/livez")
            time.sleep(2)  # the first poll (nothing there) is over
            log(f"subscriptions: writing {count:,} appointments at {rate:.0f}/s")
            written, achieved = feed(fhir, count, rate)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and sandbox(rig.paubox, "GET", "/_sandbox/stats")["accepted"] < count:
                time.sleep(0.2)
    except HarnessError as exc:
        log(f"subscriptions: failed ({exc})")
        raise
    finally:
        rig.procs.stop(process)
    delays = []
    for message in sandbox(rig.paubox, "GET", "/_sandbox/messages")["messages"]:
        key = message["custom_headers"].get("X-Notification-Key", "")
        appointment_id = key.split("|")[0].rsplit(":", 1)[-1]
        if appointment_id in written:
            accepted = datetime.fromisoformat(message["received_at"])
            delays.append((written[appointment_id], (accepted - written[appointment_id]).total_seconds() * 1000))
    (folder / "latencies.csv").write_text("".join(f"{when.isoformat()},{delay:.1f}\n" for when, delay in delays))
    return delays, count, achieved, sweeps(folder / "subscribed-daemon.log")


def report_subscriptions(
    report: Report,
    written: list[tuple[datetime, float]],
    count: int,
    achieved: float,
    duration: float,
    swept: list[Sweep],
) -> None:
    delays = [delay for _when, delay in written]
    report.section(
        f"5. Latency with Subscriptions: {count:,} appointments written at {achieved:.0f}/s for {duration:.0f} s; "
        "`connector run` with the product's defaults (poll every 60 s, sweep 1m, dispatch every 10 s, woken "
        "by what is planned), a rest-hook Subscription (id-only)"
    )
    if not delays:
        report.row(
            "notification → accepted", "no message accepted", "p99 ≤ 300 ms", False, "Subscriptions p99 ≤ 300 ms"
        )
        return
    p50, p99 = percentile(delays, 0.50), percentile(delays, 0.99)
    log(f"subscriptions: p50 {p50:.0f} ms, p99 {p99:.0f} ms over {len(delays)} messages")
    report.row(
        "write → accepted p50 / p99",
        f"{p50:,.0f} ms / {p99:,.0f} ms",
        "p99 ≤ 300 ms",
        p99 <= 300,
        "Subscriptions: write → accepted p99 ≤ 300 ms",
    )
    report.row("  max; accepted / written", f"{max(delays):,.0f} ms; {len(delays):,} / {count:,}")
    first, last = min(when for when, _delay in written), max(when for when, _delay in written)
    during = [(began, ended) for began, ended in swept if ended >= first and began <= last]
    inside = [delay for when, delay in written if any(began <= when <= ended for began, ended in during)]
    outside = [delay for when, delay in written if not any(began <= when <= ended for began, ended in during)]
    lengths = ", ".join(f"{(ended - began).total_seconds():.1f} s" for began, ended in during) or "none"
    report.row("  sweeps while writing (each)", lengths)
    for label, part in (("  written during a sweep", inside), ("  written outside sweeps", outside)):
        if part:
            report.row(
                f"{label} p50 / p99",
                f"{percentile(part, 0.5):,.0f} ms / {percentile(part, 0.99):,.0f} ms ({len(part):,})",
            )
