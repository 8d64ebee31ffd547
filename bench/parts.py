"""The measurements of the benchmark, each adding its rows to the report: start-up, end to end (with the
naive loop, growth and the ledger's share by profile), peak memory of a large first poll, event → accepted
latency while polling, and with a Subscription."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench import sekmet
from bench.endtoend import ONE_BY_ONE, TUNED, Measured, Setting, connector_run, naive_run, startup
from bench.rig import Rig, describe_dispatch, pipeline_run, sandbox
from bench.servers import bench_appointment
from bench.subscribed import report_subscriptions, subscription_latency
from bench.table import Report, log, median, percentile
from connector.config.delivery import DispatchConfig
from connector.testing import HarnessError


@dataclass(frozen=True)
class Sizes:
    appointments: int  # for the pipeline runs
    naive: int  # messages for the naive loop (its rate is extrapolated: it is linear)
    resync: int  # appointments for the memory run
    resync_dispatch: float  # seconds of sending after the resync poll
    rate: float  # appointments/s for the latency run
    duration: float  # seconds of feeding for the latency run
    repeats: int  # unused (kept for --repeats)
    growth: int  # N of the growth rows (N, 4N, 16N)


FULL = Sizes(
    appointments=4000, naive=200, resync=100_000, resync_dispatch=30, rate=100, duration=30, repeats=1, growth=1000
)
QUICK = Sizes(
    appointments=1000, naive=60, resync=10_000, resync_dispatch=10, rate=100, duration=10, repeats=1, growth=250
)


Baseline = tuple[Measured, Measured | None]  # the naive loop; the default config on the FHIR test server


def throughput(rig: Rig, sizes: Sizes, args: argparse.Namespace, report: Report) -> Baseline:
    """End to end, as users run it (bench/endtoend.py): the naive loop, the product's default config, tuned,
    one by one, PostgreSQL with 1 and 3 daemons; then growth at N, 4N, 16N with the default config."""
    empty_process, empty = rig.procs.server("fhir")
    started = startup(rig, empty)
    rig.procs.stop(empty_process)
    report.section("0. Start-up: fresh processes, median of 5 (the ledger exists, nothing is due)")
    version, idle = median(started.version_wall), median(started.idle_cpu)
    report.row("`connector --version`, wall time", f"{version:.2f} s", "< 0.3 s", version < 0.3, "--version < 0.3 s")
    report.row(
        "`connector run --once` with nothing due, CPU time",
        f"{idle:.2f} s (wall {median(started.idle_wall):.2f} s, RSS {started.idle_rss_kb / 1024:.0f} MB)",
        "< 1 s",
        idle < 1.0,
        "run --once with nothing due < 1 s of CPU",
    )

    n = sizes.appointments
    fhir_process, fhir = rig.procs.server("fhir", "--appointments", str(n))
    naive = naive_run(rig, fhir, sizes.naive)
    rows: list[tuple[Setting, Measured]] = []
    settings = [
        Setting("default config", None),
        Setting("tuned", TUNED),
        Setting("one by one", ONE_BY_ONE),
        Setting("tuned, PostgreSQL, 1 daemon", TUNED, 1, True, forever=True),
        Setting("tuned, PostgreSQL, 3 daemons", TUNED, 3, True, forever=True),
    ]
    for setting in settings:
        if setting.postgres and args.no_postgres:
            continue
        rows.append((setting, connector_run(rig, fhir, setting, n, slug(setting.label))))
    profile = ledger_profile(rig, fhir, n) if args.profile or not args.quick else None
    rig.procs.stop(fhir_process)

    defaults = DispatchConfig()
    report.section(
        f"1. End to end: {n:,} booked appointments, `connector run --once` from process start to the last "
        f"accepted message; sandbox {PAUBOX_CHARGE}"
    )
    report.row(
        f"naive loop (bench/naive.py): {naive.sent} msgs, one at a time",
        f"{naive.rate:,.1f} /s; {naive.cpu_ms:.2f} ms CPU/notif.; {naive.rss_kb / 1024:.0f} MB",
    )
    by_label = {setting.label: measured for setting, measured in rows}
    for setting, measured in rows:
        how = describe_dispatch(
            {**defaults.model_dump(include={"bulk", "concurrency", "batch_size"}), **(setting.dispatch or {})}
        )
        if setting.forever:
            how += "; `connector run` (not --once), dispatch every 1 s, stopped once all were accepted"
        times = measured.rate / naive.rate
        report.row(
            f"{setting.label}: {how}",
            f"{measured.rate:,.0f} /s = {times:,.1f}× naive",
            *target_times(setting, times),
        )
        cpu_target = cpu_target_of(setting, measured.cpu_ms)
        report.row(
            "  CPU per notification (all its processes, start-up included)",
            f"{measured.cpu_ms:.2f} ms",
            *((*cpu_target, setting.label + ":") if cpu_target else ()),
        )
        report.row(
            "  peak RSS (largest process); FHIR requests",
            f"{measured.rss_kb / 1024:.0f} MB; {measured.fhir_requests:,}",
        )
        if measured.problem:
            report.notes.append(f"{setting.label}: {measured.problem.strip()}")
    one, three = by_label.get("tuned, PostgreSQL, 1 daemon"), by_label.get("tuned, PostgreSQL, 3 daemons")
    if one and three and one.sent and three.sent:
        requests = (three.fhir_requests / three.sent) / (one.fhir_requests / one.sent) - 1
        cpu = three.cpu_ms / one.cpu_ms - 1
        report.row(
            "3 daemons vs 1: FHIR requests per notification",
            f"{requests:+.0%}",
            "≤ +10 %",
            requests <= 0.10,
            "3 daemons: FHIR requests/notification within 10 % of 1",
        )
        report.row(
            "3 daemons vs 1: CPU per notification",
            f"{cpu:+.0%}",
            "≤ +20 %",
            cpu <= 0.20,
            "3 daemons: CPU/notification within 20 % of 1",
        )
    if profile:
        report.row("ledger's share of the CPU (cProfile of a tuned run, in-process)", f"{profile[0]:.0%}")
        report.notes.append(profile[1])

    report.section("2. Growth: the default config at N, 4N, 16N appointments (end to end, as above)")
    for count in (sizes.growth, sizes.growth * 4, sizes.growth * 16):
        process, url = rig.procs.server("fhir", "--appointments", str(count), timeout=600)
        measured = connector_run(rig, url, Setting("default config", None), count, f"growth-{count}")
        rig.procs.stop(process)
        report.row(
            f"{count:,} appointments",
            f"{measured.wall:,.1f} s ({measured.rate:,.0f} /s), {measured.cpu_ms:.2f} ms CPU/notif., "
            f"peak RSS {measured.rss_kb / 1024:.0f} MB",
        )
        if measured.problem:
            report.notes.append(f"growth {count}: {measured.problem.strip()}")
    return naive, by_label.get("default config")


def real_server(rig: Rig, sizes: Sizes, report: Report, baseline: Baseline | None) -> None:
    """The default config and tuned against sekmet-fhir (bench/sekmet.py), beside the naive loop and the default
    config on the FHIR test server (measured here when the throughput part did not run)."""
    n = sizes.appointments
    if baseline is None:
        process, fhir = rig.procs.server("fhir", "--appointments", str(n))
        naive = naive_run(rig, fhir, sizes.naive)
        baseline = naive, connector_run(rig, fhir, Setting("default config", None), n, "default-config")
        rig.procs.stop(process)
    settings = [Setting("default config, sekmet-fhir", None), Setting("tuned, sekmet-fhir", TUNED)]
    sekmet.report_rows(report, n, baseline[0], sekmet.measure(rig, n, settings), baseline[1])


PAUBOX_CHARGE = "50 ms per request + 1 ms per message it carries"


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")


def target_times(setting: Setting, times: float) -> tuple[str, bool, str] | tuple[()]:
    if setting.label == "default config":
        return ("≥ 20× naive", times >= 20, "default config ≥ 20× the naive loop")
    if setting.label == "tuned":
        return ("≥ 100× naive", times >= 100, "tuned ≥ 100× the naive loop")
    return ()


def cpu_target_of(setting: Setting, cpu_ms: float) -> tuple[str, bool, str] | None:
    if setting.label == "tuned":
        return ("≤ 0.5 ms", cpu_ms <= 0.5, "CPU ≤ 0.5 ms per notification in bulk")
    if setting.label == "one by one":
        return ("≤ 1.5 ms", cpu_ms <= 1.5, "CPU ≤ 1.5 ms per notification one by one")
    return None


def ledger_profile(rig: Rig, fhir: str, n: int) -> tuple[float, str]:
    """The ledger's share of the CPU, by profile: one tuned run in-process (bench/workers.py) under cProfile
    in thread CPU time; the ledger is every function of connector/ledger, SQLAlchemy and sqlite3 on the event
    loop's thread plus everything on the threads asyncio.to_thread runs (only ledger calls go there)."""
    prefix = str(rig.root / "profile-")
    pipeline_run(rig, fhir, TUNED, n, False, "pipeline-tuned-profiled", profile=prefix)
    return ledger_share(prefix), profile_summary(prefix)


def ledger_share(prefix: str) -> float:
    import pstats

    total = ledger = 0.0
    for name in ("main", "ledger"):
        path = Path(prefix + f"{name}.pstats")
        if not path.exists():
            continue
        stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
        for (file, _, _), (_, _, own, _, _) in stats.items():
            total += own
            if name == "ledger" or any(part in file for part in LEDGER_FILES):
                ledger += own
    return ledger / total if total else 0.0


LEDGER_FILES = ("/connector/ledger/", "/sqlalchemy/", "/sqlite3/", "/psycopg/")


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


def subscriptions(rig: Rig, sizes: Sizes, report: Report) -> None:
    count = int(sizes.rate * sizes.duration)
    written, count, achieved, swept = subscription_latency(rig, count, sizes.rate, feed)
    report_subscriptions(report, written, count, achieved, sizes.duration, swept)


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
