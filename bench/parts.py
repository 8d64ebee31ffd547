"""The four measurements of the benchmark, each adding its rows to the report: throughput (with the naive
loop), the ledger on and "off", peak memory of a large first poll, and event → accepted latency."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.rig import Rig, describe_dispatch, naive_auth, pipeline_run, sandbox
from bench.servers import bench_appointment
from bench.table import Report, log, median, mount_of, percentile
from connector.testing import HarnessError


@dataclass(frozen=True)
class Sizes:
    appointments: int  # for the pipeline runs
    naive: int  # messages for the naive loop (its rate is extrapolated: it is linear)
    resync: int  # appointments for the memory run
    resync_dispatch: float  # seconds of sending after the resync poll
    rate: float  # appointments/s for the latency run
    duration: float  # seconds of feeding for the latency run
    repeats: int  # runs of the bulk pipeline with the ledger on and off (median reported)


FULL = Sizes(appointments=3000, naive=200, resync=100_000, resync_dispatch=30, rate=100, duration=30, repeats=3)
QUICK = Sizes(appointments=1000, naive=60, resync=10_000, resync_dispatch=10, rate=100, duration=10, repeats=1)


def throughput(rig: Rig, sizes: Sizes, args: argparse.Namespace, report: Report) -> None:
    bulk = {"bulk": 50, "concurrency": args.bulk_concurrency, "batch_size": args.batch_size}
    single = {"bulk": 0, "concurrency": args.concurrency, "batch_size": args.batch_size}
    n = sizes.appointments
    fhir_process, fhir = rig.procs.server("fhir", "--appointments", str(n))
    on: list[dict[str, Any]] = []
    off: list[dict[str, Any]] = []
    for repeat in range(sizes.repeats):  # interleaved, so that drift hits both alike
        on.append(pipeline_run(rig, fhir, bulk, n, False, f"pipeline-bulk-on-{repeat + 1}"))
        if repeat == 0:
            messages = sandbox(rig.paubox, "GET", "/_sandbox/messages")["messages"][:50]
            (rig.root / "samples.json").write_text(json.dumps(messages))
        if rig.ram:
            off.append(pipeline_run(rig, fhir, bulk, n, True, f"pipeline-bulk-off-{repeat + 1}"))
    one = pipeline_run(rig, fhir, single, n, False, "pipeline-one-by-one-on")
    profile = None
    if args.profile:
        prefix = str(rig.root / "profile-")
        pipeline_run(rig, fhir, bulk, n, False, "pipeline-bulk-profiled", profile=prefix)
        profile = prefix
    rig.procs.stop(fhir_process)

    naive = rig.procs.worker(
        "naive",
        {"paubox": rig.paubox, "samples": str(rig.root / "samples.json"), "count": sizes.naive, **naive_auth()},
        timeout=60 + sizes.naive,
        name="naive",
    )
    naive_rate = naive["sent"] / naive["elapsed"]
    log(f"naive: {naive['sent']} in {naive['elapsed']:.1f} s = {naive_rate:.1f}/s")

    bulk_rate = median([r["rate"] for r in on])
    report.section(
        f"1. Throughput: {n:,} booked appointments, FHIR page size {rig.page_size}, sandbox 50 ms per request"
    )
    spread = (
        f" (median of {len(on)}: {min(r['rate'] for r in on):,.0f}–{max(r['rate'] for r in on):,.0f})"
        if len(on) > 1
        else ""
    )
    for short, dispatch, rate, runs in (("bulk", bulk, bulk_rate, on), ("one by one", single, one["rate"], [one])):
        polled = [r["poll_seconds"] for r in runs if r["poll_seconds"]]
        detail = f"{rate:,.0f} /s" + (spread if runs is on else "")
        report.row(
            f"pipeline, {describe_dispatch(dispatch)}",
            detail,
            "≥ 2,000 /s",
            rate >= 2000,
            "≥ 2,000 notifications/s",
            f"{short}:",
        )
        report.row(
            "  poll phase / whole run_once",
            f"{median(polled):.1f} s / {median([r['elapsed'] for r in runs]):.1f} s" if polled else "?",
        )
        report.row(
            "  vs naive loop",
            f"{rate / naive_rate:,.1f}×",
            "≥ 50×",
            rate / naive_rate >= 50,
            "≥ 50× the naive loop",
            f"{short}:",
        )
        problems = "".join(r["problem"] for r in runs)
        if problems:
            report.notes.append(f"pipeline {short}: {problems.strip()}")
    report.row(
        f"naive loop: 1 POST at a time, {naive['sent']} msgs",
        f"{naive_rate:,.1f} /s ({n:,} would take {n / naive_rate:,.0f} s)",
    )
    cpu = median([r["cpu"] / r["elapsed"] for r in on])
    report.row("connector process CPU during the bulk run", f"{cpu:.0%} of one core")

    report.section(
        '2. Ledger: on = SQLite file, WAL, synchronous=FULL (default); "off" = same SQLite on tmpfs /dev/shm'
    )
    report.row(f"ledger on ({mount_of(rig.root)})", f"{bulk_rate:,.0f} /s")
    if off:
        off_rate = median([r["rate"] for r in off])
        overhead = (off_rate - bulk_rate) / off_rate
        report.row('ledger "off" (RAM: same SQL, no disk I/O or fsync)', f"{off_rate:,.0f} /s")
        report.row(
            "ledger overhead: (off − on) / off",
            f"{overhead:.0%}",
            "≤ 10 %",
            overhead <= 0.10,
            "ledger overhead ≤ 10 %",
            "on vs off:",
        )
    else:
        report.row('ledger "off"', "not measured: no tmpfs at /dev/shm")
    share = median([r["ledger_cpu"] / r["cpu"] for r in on if r["cpu"]])
    report.row(
        "CPU of the ledger's threads / process CPU (on)",
        f"{share:.0%}",
        "≤ 10 %",
        share <= 0.10,
        "ledger overhead ≤ 10 %",
        "CPU share:",
    )
    if profile:
        report.notes.append(profile_summary(profile))


def profile_summary(prefix: str, top: int = 10) -> str:
    """The profiled run's top functions by own CPU time, and the connector's own functions by cumulative
    CPU time, for the event loop's thread and for the ledger's threads."""
    import pstats

    def short(where: tuple[str, int, str]) -> str:
        path, line, name = where
        for marker in ("site-packages/", "/python3.11/", "/work/main/"):
            path = path.split(marker, 1)[-1]
        return f"{path}:{line} {name}" if line else name

    lines = []
    for name, label in (("main", "event loop thread"), ("ledger", "ledger threads (asyncio.to_thread)")):
        path = Path(prefix + f"{name}.pstats")
        if not path.exists():
            continue
        stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
        total = sum(own for _, _, own, _, _ in stats.values())
        lines.append(f"cProfile of one more bulk run ({label}, CPU time {total:.1f} s under the profiler):")
        ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
        lines += [f"  own {own:6.2f} s  {calls:>8,}×  {short(where)}" for where, (_, calls, own, _, _) in ranked]
        ours = sorted(((w, v) for w, v in stats.items() if "/connector/" in w[0]), key=lambda item: -item[1][3])
        lines += [f"  cum {cum:6.2f} s  {calls:>8,}×  {short(where)}" for where, (_, calls, _, cum, _) in ours[:top]]
    return "\n".join(lines)


def memory(rig: Rig, sizes: Sizes, report: Report) -> None:
    n = sizes.resync
    log(f"resync: loading {n:,} appointments into the FHIR server")
    fhir_process, fhir = rig.procs.server("fhir", "--appointments", str(n), timeout=600)
    spec = rig.spec(
        fhir,
        {"bulk": 50, "concurrency": 16, "batch_size": 500},
        rig.root / "ledger-resync",
        instant=True,
        dispatch_seconds=sizes.resync_dispatch,
    )
    result = rig.procs.worker("resync", spec, timeout=120 + n / 200 + sizes.resync_dispatch * 4, name="resync")
    rig.procs.stop(fhir_process)
    peak = result["peak_rss_kb"] * 1024 / 1e6
    log(f"resync: poll {result['poll_seconds']:.0f} s, peak RSS {peak:.0f} MB, sent {result['sent']}")
    report.section(
        f"3. Memory: first poll of {n:,} appointments (poll + plan + commit), then "
        f"{sizes.resync_dispatch:.0f} s of sending through a mailer that accepts at once"
    )
    report.row(
        "peak RSS (VmHWM) of the connector process",
        f"{peak:,.0f} MB",
        "≤ 300 MB",
        peak <= 300,
        "peak RSS ≤ 300 MB",
        f"{n:,}:",
    )
    report.row(
        "  RSS after start-up / peak by the end of the poll",
        f"{result['rss_open_kb'] * 1024 / 1e6:,.0f} MB / {result['peak_rss_poll_kb'] * 1024 / 1e6:,.0f} MB",
    )
    report.row(
        "  poll + plan + commit",
        f"{result['planned']:,} planned in {result['poll_seconds']:.0f} s "
        f"= {result['planned'] / result['poll_seconds']:,.0f} /s",
    )
    if result["dispatch_seconds"]:
        report.row(
            "  then sending, stopped after the slice",
            f"{result['sent']:,} in "
            f"{result['dispatch_seconds']:.0f} s = {result['sent'] / result['dispatch_seconds']:,.0f} /s",
        )
    if result["poll_error"]:
        report.notes.append(f"resync poll error: {result['poll_error']}")


def latency(rig: Rig, sizes: Sizes, args: argparse.Namespace, report: Report) -> None:
    count = int(sizes.rate * sizes.duration)
    fhir_process, fhir = rig.procs.server("fhir", "--patients", str(count))
    sandbox(rig.paubox, "DELETE", "/_sandbox/messages")
    dispatch = {"bulk": 50, "concurrency": args.bulk_concurrency, "batch_size": args.batch_size}
    spec = rig.spec(
        fhir,
        dispatch,
        rig.root / "ledger-latency",
        overlap=args.overlap,
        sweep=args.sweep,
        source_interval=f"{args.poll_interval}s",
        interval=args.poll_interval,
        duration=sizes.duration,
        drain=30.0,
        expected=count,
    )
    process = rig.procs.start("bench.workers", "latency", json.dumps(spec), log_name="latency.log", name="latency")
    if process.read_line(120).strip() != "ready":
        raise HarnessError(f"the latency worker did not start; see {process.log_path}")
    log(f"latency: writing {count:,} appointments at {sizes.rate:.0f}/s")
    written, achieved = feed(fhir, count, sizes.rate)
    result = rig.procs.finish(process, timeout=sizes.duration + 120)
    rig.procs.stop(fhir_process)
    messages = sandbox(rig.paubox, "GET", "/_sandbox/messages")["messages"]
    delays = []
    for message in messages:
        key = message["custom_headers"].get("X-Notification-Key", "")
        appointment_id = key.split("|")[0].rsplit(":", 1)[-1]
        if appointment_id in written:
            accepted = datetime.fromisoformat(message["received_at"])
            delays.append((accepted - written[appointment_id]).total_seconds() * 1000)
    report.section(
        f"4. Latency: {count:,} appointments written at {achieved:.0f}/s for {sizes.duration:.0f} s; "
        f"run_once every {args.poll_interval * 1000:.0f} ms, overlap {args.overlap}, sweep {args.sweep}, bulk 50"
    )
    if not delays:
        report.row("event → accepted", "no message accepted", "p99 ≤ 500 ms", False, "event → accepted p99 ≤ 500 ms")
        return
    p50, p99 = percentile(delays, 0.50), percentile(delays, 0.99)
    log(f"latency: p50 {p50:.0f} ms, p99 {p99:.0f} ms over {len(delays)} messages")
    report.row(
        "event → accepted p50 / p99",
        f"{p50:,.0f} ms / {p99:,.0f} ms",
        "p99 ≤ 500 ms",
        p99 <= 500,
        "event → accepted p99 ≤ 500 ms",
    )
    report.row("  max; accepted / written", f"{max(delays):,.0f} ms; {len(delays):,} / {count:,}")
    report.row(
        "  cycles: count, mean, longest",
        f"{result['cycles']}, {result['mean_cycle'] * 1000:,.0f} ms, {result['longest_cycle'] * 1000:,.0f} ms",
    )


def feed(fhir: str, count: int, rate: float) -> tuple[dict[str, datetime], float]:
    """PUT `count` booked appointments at `rate` per second; their meta.lastUpdated by id."""
    written: dict[str, datetime] = {}
    now = datetime.now(UTC)
    with httpx.Client(base_url=fhir, timeout=10) as client:
        start = time.monotonic()
        for index in range(count):
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            body = bench_appointment(index, now)
            response = client.put(f"/Appointment/{body['id']}", json=body)
            response.raise_for_status()
            stamp = response.json()["meta"]["lastUpdated"]
            written[body["id"]] = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        elapsed = time.monotonic() - start
    return written, count / elapsed if elapsed else rate
