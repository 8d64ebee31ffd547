"""connector benchmark: throughput, ledger overhead, peak memory and latency, printed as one table.

Every figure comes from real processes on 127.0.0.1: the FHIR test server and the Paubox sandbox (the
package's own apps, served by uvicorn) each run in their own process, and each measurement of the connector
runs in a fresh process of its own (bench/workers.py), so that the two cores are shared honestly and the
memory figure is that process's alone. No pass/fail in code: figures, the targets beside them, and which
targets were met.

  1. notifications/s from FHIR pages to accepted sends (sandbox: 50 ms per request) for the connector's
     pipeline (run_once: poll + plan + ledger + dispatch), in bulk and one by one, against a naive loop
     that posts one message at a time and waits for each answer, as the official SDKs do;
  2. the same pipeline with the ledger on (SQLite file, WAL, synchronous=FULL: the product default) and
     "off" (the same SQLite ledger on RAM-backed tmpfs, /dev/shm: identical SQL, no disk writes or fsync);
  3. peak RSS (VmHWM) of a first poll of a large FHIR server (poll + plan + commit), then a bounded slice
     of sending through a mailer that accepts at once (no network);
  4. event → accepted latency: appointments written to the FHIR server at a steady rate while a
     daemon-like loop runs run_once every poll interval; latency = the sandbox's received_at minus the
     appointment's meta.lastUpdated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from servers import appointment  # noqa: E402 - bench/ is not a package

PY = sys.executable
NOTIF = "notifications/s"


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


@dataclass
class Target:
    name: str
    figure: str
    met: bool


@dataclass
class Report:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # measure, figure, target, verdict
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def section(self, title: str) -> None:
        self.rows.append((title, "", "", ""))

    def row(
        self,
        measure: str,
        figure: str,
        target: str = "",
        met: bool | None = None,
        target_name: str = "",
        label: str = "",
    ) -> None:
        """A line of the table; with `met`, also a target in the summary (`label`: which variant)."""
        verdict = "" if met is None else ("met" if met else "NOT met")
        self.rows.append(("  " + measure, figure, target, verdict))
        if met is not None:
            self.targets.append(Target(target_name or target, f"{label} {figure}".strip(), met))

    def summary(self, met: bool) -> str:
        grouped: dict[str, list[str]] = {}
        for target in self.targets:
            if target.met is met:
                grouped.setdefault(target.name, []).append(target.figure)
        return "; ".join(f"{name} ({', '.join(figures)})" for name, figures in grouped.items()) or "none"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- processes -----------------------------------------------------------------------------------------


class Processes:
    """Every process this benchmark starts; stopped by their own handles at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.running: list[subprocess.Popen[str]] = []

    def server(self, kind: str, *args: str, timeout: float = 180) -> tuple[subprocess.Popen[str], str]:
        errors = (self.folder / f"{kind}-server.log").open("a")
        command = [PY, str(HERE / "servers.py"), kind, *args]
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,  # noqa: S603 - our own script
            stderr=errors,
            text=True,
            cwd=HERE.parent,
        )
        self.running.append(process)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the {kind} server did not start; see {errors.name}")
        return process, json.loads(line)["url"]

    def stop(self, process: subprocess.Popen[str]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        for process in list(self.running):
            self.stop(process)

    def worker(self, role: str, spec: dict[str, Any], timeout: float, name: str) -> dict[str, Any]:
        errors = self.folder / f"{name}.log"
        with errors.open("w") as stderr:
            process = subprocess.Popen(
                [PY, str(HERE / "workers.py"), role, json.dumps(spec)],  # noqa: S603 - ours
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=HERE.parent,
            )
            self.running.append(process)
            try:
                out, _ = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.stop(process)
                raise RuntimeError(f"{name}: no result within {timeout:.0f} s; see {errors}") from None
            self.running.remove(process)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if process.returncode != 0 or not lines:
            tail = "".join(errors.read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"{name} failed (exit {process.returncode}); last log lines:\n{tail}")
        result: dict[str, Any] = json.loads(lines[-1])
        result["log"] = str(errors)
        return result


# -- helpers ---------------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(share * len(ordered) + 0.5)))
    return ordered[rank - 1]


def mount_of(path: Path) -> str:
    """'ext4 /dev/vda' for the file system holding `path`."""
    best, found = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        device, point, kind = line.split()[:3]
        if str(path).startswith(point) and len(point) > len(best):
            best, found = point, f"{kind} {device}"
    return found


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = next(
        (
            int(line.split()[1]) // 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    return (
        f"{os.cpu_count()} CPUs ({model}), {memory:,} MiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )


def busy_cpu_seconds() -> float:
    """CPU time all processes on the machine used so far (the busy jiffies of /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this process and of its finished children (every server and worker it started)."""
    import resource

    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


def poll_seconds(result: dict[str, Any]) -> float | None:
    """When the poll ended, from the connector's own `poll.done` log line (console format)."""
    for line in Path(result["log"]).read_text().splitlines():
        if "poll.done" in line:
            try:
                ended = datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
                return ended - float(result["started_at"])
            except ValueError:
                return None
    return None


def sandbox(url: str, method: str, path: str) -> Any:
    with httpx.Client(base_url=url, timeout=60) as client:
        response = client.request(method, path)
        response.raise_for_status()
        return response.json()


# -- the measurements ------------------------------------------------------------------------------------


@dataclass
class Rig:
    procs: Processes
    root: Path
    ram: Path | None
    paubox: str
    page_size: int
    runs: int = 0

    def spec(self, fhir: str, dispatch: dict[str, int], ledger_dir: Path, **extra: Any) -> dict[str, Any]:
        self.runs += 1
        work = self.root / f"run{self.runs}"
        ledger_dir.mkdir(parents=True, exist_ok=True)
        return {
            "workdir": str(work),
            "fhir": fhir,
            "paubox": self.paubox,
            "page_size": self.page_size,
            "ledger": str(ledger_dir / f"ledger{self.runs}.db"),
            "dispatch": dispatch,
            **extra,
        }


def pipeline_run(
    rig: Rig, fhir: str, dispatch: dict[str, int], expected: int, ram: bool, name: str, profile: str | None = None
) -> dict[str, Any]:
    sandbox(rig.paubox, "DELETE", "/_sandbox/messages")
    ledger_dir = (rig.ram if ram and rig.ram else rig.root) / f"ledger-{rig.runs + 1}"
    spec = rig.spec(fhir, dispatch, ledger_dir, profile=profile)
    result = rig.procs.worker("pipeline", spec, timeout=max(180, expected / 10), name=name)
    stats = sandbox(rig.paubox, "GET", "/_sandbox/stats")
    result["accepted"] = stats["accepted"]
    result["most_copies"] = max(stats["per_key"].values(), default=0)
    result["rate"] = result["sent"] / result["elapsed"]
    result["poll_seconds"] = poll_seconds(result)
    shutil.rmtree(ledger_dir, ignore_errors=True)
    problem = (
        ""
        if result["sent"] == expected == result["accepted"] and result["most_copies"] == 1
        else f" (CHECK: sent {result['sent']}, sandbox accepted {result['accepted']}, counts {result['counts']})"
    )
    log(f"{name}: {result['sent']} in {result['elapsed']:.1f} s = {result['rate']:,.0f}/s{problem}")
    result["problem"] = problem
    return result


def describe_dispatch(dispatch: dict[str, int]) -> str:
    how = f"bulk {dispatch['bulk']}" if dispatch["bulk"] > 1 else "one by one"
    return f"{how}, concurrency {dispatch['concurrency']}, batch {dispatch['batch_size']}"


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
        {"paubox": rig.paubox, "samples": str(rig.root / "samples.json"), "count": sizes.naive},
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
    errors = rig.procs.folder / "latency.log"
    with errors.open("w") as stderr:
        process = subprocess.Popen(
            [PY, str(HERE / "workers.py"), "latency", json.dumps(spec)],  # noqa: S603 - ours
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=HERE.parent,
        )
        rig.procs.running.append(process)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 120)
        if not ready or process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the latency worker did not start; see {errors}")
        log(f"latency: writing {count:,} appointments at {sizes.rate:.0f}/s")
        written, achieved = feed(fhir, count, sizes.rate)
        out, _ = process.communicate(timeout=sizes.duration + 120)
        rig.procs.running.remove(process)
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
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
            body = appointment(index, now)
            response = client.put(f"/Appointment/{body['id']}", json=body)
            response.raise_for_status()
            stamp = response.json()["meta"]["lastUpdated"]
            written[body["id"]] = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        elapsed = time.monotonic() - start
    return written, count / elapsed if elapsed else rate


# -- output ------------------------------------------------------------------------------------------------


def render(report: Report, header: list[str]) -> str:
    width = [max(len(r[i]) for r in report.rows if r[1] or i == 0) for i in range(4)]
    width[0] = min(width[0], 64)
    lines = [*header, ""]
    head = ("measure", "figure", "target", "")
    lines.append(f"{head[0]:<{width[0]}}  {head[1]:<{width[1]}}  {head[2]:<{width[2]}}  {head[3]}".rstrip())
    for measure, figure, target, verdict in report.rows:
        if not figure:
            lines += ["", measure]
            continue
        lines.append(f"{measure:<{width[0]}}  {figure:<{width[1]}}  {target:<{width[2]}}  {verdict}".rstrip())
    lines += ["", "Targets met:     " + report.summary(True), "Targets NOT met: " + report.summary(False)]
    if report.notes:
        lines += ["", *report.notes]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="bench/run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (1,000 appointments, 10,000 for memory, 10 s of latency): ~2 minutes",
    )
    parser.add_argument("--appointments", type=int, help="appointments for the throughput runs (default 3,000)")
    parser.add_argument("--naive", type=int, help="messages for the naive loop (default 200)")
    parser.add_argument("--resync", type=int, help="appointments for the memory run (default 100,000)")
    parser.add_argument("--duration", type=float, help="seconds of events for the latency run (default 30)")
    parser.add_argument("--repeats", type=int, help="bulk runs with the ledger on and off (default 3, median)")
    parser.add_argument("--page-size", type=int, default=50, help="sources.ehr.page_size (default 50, the product's)")
    parser.add_argument("--batch-size", type=int, default=500, help="dispatch.batch_size (default 500)")
    parser.add_argument(
        "--bulk-concurrency", type=int, default=16, help="dispatch.concurrency with bulk 50 (default 16)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="dispatch.concurrency one by one (default 32)")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.2,
        help="latency run: seconds from one run_once to the next (default 0.2)",
    )
    parser.add_argument("--overlap", default="5m", help="latency run: sources.ehr.overlap (default 5m, the product's)")
    parser.add_argument(
        "--sweep",
        default="1m",
        help="latency run: sources.ehr.sweep (default 1m, the product's; "
        "the 30 s run then holds no sweep but the first poll; "
        "with a short --overlap give a shorter --sweep)",
    )
    parser.add_argument(
        "--only", choices=["throughput", "memory", "latency"], action="append", help="run only these parts (repeatable)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more bulk run under cProfile; print the top functions (event loop, ledger threads)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs, profiles)")
    args = parser.parse_args()
    base = QUICK if args.quick else FULL
    sizes = Sizes(
        appointments=args.appointments or base.appointments,
        naive=args.naive or base.naive,
        resync=args.resync or base.resync,
        resync_dispatch=base.resync_dispatch,
        rate=base.rate,
        duration=args.duration or base.duration,
        repeats=args.repeats or base.repeats,
    )
    parts = args.only or ["throughput", "memory", "latency"]

    root = Path(tempfile.mkdtemp(prefix="connector-bench-"))
    shm = Path("/dev/shm")  # noqa: S108 - a private folder is made in it with mkdtemp
    ram = (
        Path(tempfile.mkdtemp(prefix="connector-bench-", dir=shm))
        if shm.is_dir() and mount_of(shm).startswith("tmpfs")
        else None
    )
    procs = Processes(root)
    report = Report()
    started, busy0, own0 = time.monotonic(), busy_cpu_seconds(), own_cpu_seconds()
    load0 = Path("/proc/loadavg").read_text().split()[0]
    try:
        _, paubox = procs.server("paubox", "--latency-ms", "50")
        rig = Rig(procs, root, ram, paubox, args.page_size)
        if "throughput" in parts:
            throughput(rig, sizes, args, report)
        if "memory" in parts:
            memory(rig, sizes, report)
        if "latency" in parts:
            latency(rig, sizes, args, report)
    finally:
        procs.stop_all()
        if ram:
            shutil.rmtree(ram, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    wall = time.monotonic() - started
    others = max(0.0, (busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0)) / wall
    header = [
        f"connector benchmark{' (--quick)' if args.quick else ''}: {machine()}",
        "Processes: FHIR test server, Paubox sandbox (uvicorn, 127.0.0.1) and each connector run in its own "
        f"process; {wall:,.0f} s in all",
        f"Other processes on the machine used {others:.2f} of its {os.cpu_count()} cores meanwhile "
        f"(load average {load0} at the start)"
        + ("" if others < 0.2 else ": the figures below are lower than on a quiet machine"),
    ]
    if args.keep:
        header.append(f"work folder kept: {root}")
    print(render(report, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
