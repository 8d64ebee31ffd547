"""End to end against a real FHIR server: sekmet-fhir from PyPI, in its own virtual environment and process.

sekmet-fhir is a FHIR R4 server with a SQLite store (search, `_include`, `_sort`, paging by `_offset`). It is
installed on first use into `.cache/bench-sekmet` (`pip install sekmet-fhir==VERSION`), never into the
connector's environment: the product does not depend on it and `scripts/test` does not need it. It is served by
bench/sekmet_server.py, loaded through its REST API (transaction Bundles of `PUT`s), checked with
`connector check`, then read by `connector run --once` processes timed as every other end-to-end row
(bench/endtoend.py). Its own cost is kept apart: the CPU per notification counts the connector's processes only
(os.wait4); the server reports its own CPU time (getrusage in its process) and the requests it served, both
read before and after the run.

Whatever fails on the way (the install, the start, the load, a check, the run) becomes the row's figure,
with the HTTP status and sekmet's diagnostics (the data is fictional; no body of a patient is printed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from bench.endtoend import Measured, Setting, connector_run
from bench.rig import ROOT, Rig, describe_dispatch
from bench.servers import bench_appointment, bench_patient
from bench.table import log
from connector.config.delivery import DispatchConfig
from connector.testing import HarnessError, cli

if TYPE_CHECKING:
    from bench.table import Report
    from connector.testing import Process

VERSION = "0.1.1"
VENV = ROOT / ".cache" / "bench-sekmet"
LOAD_CHUNK = 100  # appointments (with their patients) per transaction Bundle


@dataclass
class SekmetRun:
    """What the sekmet rows need: the measured runs by label, or why there are none."""

    rows: list[tuple[Setting, Measured]]
    checks: str = ""  # what `connector check` said about the server
    load: str = ""  # how the data went in
    failure: str = ""  # why a row could not be measured


def sekmet_python() -> Path:
    """The interpreter of `.cache/bench-sekmet`, made (and sekmet-fhir installed) the first time."""
    python, stamp = VENV / "bin" / "python", VENV / ".bench-installed"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == VERSION:
        return python
    log(f"sekmet: installing sekmet-fhir {VERSION} into {VENV.relative_to(ROOT)}")
    for argv in (
        [sys.executable, "-m", "venv", "--clear", str(VENV)],
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"sekmet-fhir=={VERSION}"],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)  # noqa: S603
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or [done.stderr[-600:]]
            raise HarnessError(f"`{' '.join(argv[1:4])} …` exited {done.returncode}: {' '.join(errors)[:600]}")
    stamp.write_text(VERSION)
    return python


def start(rig: Rig) -> tuple[Process, str]:
    """sekmet-fhir in its own process, on an empty store; its FHIR base URL."""
    folder = rig.root / "sekmet-store"
    folder.mkdir(parents=True, exist_ok=True)
    process = rig.procs.start(
        "bench.sekmet_server", str(folder), log_name="sekmet-server.log", name="sekmet-fhir", python=sekmet_python()
    )
    return process, str(json.loads(process.read_line(120))["url"])


def load(url: str, count: int) -> str:
    """`count` booked appointments and their patients, `PUT` by transaction Bundles; what it took."""
    now, started = datetime.now(UTC), datetime.now(UTC)
    with httpx.Client(base_url=url, timeout=300) as client:
        for first in range(0, count, LOAD_CHUNK):
            entries = []
            for index in range(first, min(count, first + LOAD_CHUNK)):
                for body in (bench_patient(index), bench_appointment(index, now)):
                    where = f"{body['resourceType']}/{body['id']}"
                    entries.append(
                        {"fullUrl": f"{url}/{where}", "resource": body, "request": {"method": "PUT", "url": where}}
                    )
            response = client.post(
                "",
                json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
                headers={"Content-Type": "application/fhir+json", "Prefer": "return=minimal"},
            )
            if response.status_code != 200:
                raise HarnessError(f"loading: POST [base] (transaction Bundle) answered {exchange(response)}")
    seconds = (datetime.now(UTC) - started).total_seconds()
    bundles = f"transaction Bundles of {LOAD_CHUNK * 2}"
    return f"{count:,} appointments and {count:,} patients PUT in {bundles} in {seconds:.0f} s"


def exchange(response: httpx.Response) -> str:
    """HTTP status and the diagnostics of an OperationOutcome, never a resource."""
    text = f"HTTP {response.status_code}"
    try:
        body: Any = response.json()
    except ValueError:
        return text
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = [f"{i.get('severity')}/{i.get('code')}: {i.get('diagnostics', '')}" for i in body.get("issue", [])]
        text += " (" + "; ".join(issues)[:600] + ")"
    return text


def preflight(rig: Rig, url: str) -> str:
    """`connector check` against sekmet (the config of a default run); its failed checks, or that all passed."""
    folder = rig.root / "sekmet-check"
    config = rig.default_config(folder, url)
    cli("db", "upgrade", "--config", config, cwd=folder)
    done = cli("check", "--json", "--config", config, cwd=folder, check=False)
    checks = json.loads(done.stdout)["checks"]
    failed = [f"{c['part']}: {c['name']}: {c['detail']}" for c in checks if not c["ok"]]
    if failed:
        return "connector check FAILED: " + "; ".join(failed)
    sources = [c["name"] for c in checks if c["part"].startswith("source")]
    return f"connector check: all {len(checks)} checks passed ({', '.join(sources)})"


def measure(rig: Rig, count: int, settings: list[Setting]) -> SekmetRun:
    """Start sekmet, load `count` appointments, check, then one `connector run --once` per setting."""
    run = SekmetRun(rows=[])
    process: Process | None = None
    try:
        process, url = start(rig)
        log(f"sekmet: loading {count:,} appointments into {url}")
        run.load = load(url, count)
        log(f"sekmet: {run.load}")
        run.checks = preflight(rig, url)
        log(f"sekmet: {run.checks}")
        for setting in settings:
            name = "sekmet-" + "".join(c if c.isalnum() else "-" for c in setting.label).strip("-")
            run.rows.append((setting, connector_run(rig, url, setting, count, name)))
    except (HarnessError, httpx.HTTPError, OSError, ValueError, KeyError, subprocess.SubprocessError) as error:
        run.failure = f"{type(error).__name__}: {error}".strip()[:1500]
        log(f"sekmet: not measured: {run.failure}")
    finally:
        if process is not None:
            rig.procs.stop(process)
    return run


def report_rows(report: Report, count: int, naive: Measured, run: SekmetRun, inmemory: Measured | None) -> None:
    """Section 1b of the table: each sekmet row beside the naive loop, the server's own CPU apart."""
    report.section(
        f"1b. End to end against a real FHIR server: sekmet-fhir {VERSION} (SQLite store, its own process), "
        f"{count:,} booked appointments; otherwise as in 1"
    )
    defaults = DispatchConfig().model_dump(include={"bulk", "concurrency", "batch_size"})
    if inmemory is not None:
        report.row(
            "default config, the in-memory FHIR test server (for comparison)",
            f"{inmemory.rate:,.0f} /s = {inmemory.rate / naive.rate:,.1f}× naive; {inmemory.cpu_ms:.2f} ms CPU/notif.",
        )
        report.row("  poll done after", polled(inmemory))
        report.row("  the test server's own CPU (its process, not counted above)", server_cpu(inmemory))
    for setting, measured in run.rows:
        how = describe_dispatch({**defaults, **(setting.dispatch or {})})
        report.row(f"{setting.label}: {how}", f"{measured.rate:,.0f} /s = {measured.rate / naive.rate:,.1f}× naive")
        report.row("  poll done after", polled(measured))
        report.row("  CPU per notification (the connector's processes only)", f"{measured.cpu_ms:.2f} ms")
        report.row(
            "  peak RSS (largest process); FHIR requests",
            f"{measured.rss_kb / 1024:.0f} MB; {measured.fhir_requests:,}",
        )
        report.row("  sekmet-fhir's own CPU (its process, not counted above)", server_cpu(measured))
        if measured.problem:
            report.notes.append(f"{setting.label}: {measured.problem.strip()}")
    if run.failure:
        first = run.failure.splitlines()[0][:100]
        label = run.rows[-1][0].label if run.rows else "default config, sekmet-fhir"
        report.row(f"{label}{' (and after)' if run.rows else ''}", f"not measured: {first}")
        report.notes.append(f"sekmet-fhir: not measured: {run.failure}")
    facts = "; ".join(fact for fact in (run.load, run.checks) if fact)
    report.notes.append(
        f"sekmet-fhir {VERSION}: {facts or 'not started'}. It runs with its own interpreter "
        f"({VENV.relative_to(ROOT)}) in its own process; the CPU per notification is the connector's processes' "
        "(os.wait4), the server's is its process's getrusage read before and after each run."
    )


def server_cpu(measured: Measured) -> str:
    if measured.server_cpu is None:
        return "not reported"
    per = measured.server_cpu * 1000 / measured.sent if measured.sent else float("nan")
    each = measured.server_cpu * 1000 / measured.fhir_requests if measured.fhir_requests else float("nan")
    return f"{measured.server_cpu:.2f} s = {per:.2f} ms per notification, {each:.0f} ms per FHIR request"


def polled(measured: Measured) -> str:
    """When `connector run --once` had read every page (it sends after its poll), of its whole run."""
    if measured.poll is None:
        return "no poll.done line in its log"
    return f"{measured.poll:.1f} s of {measured.wall:.1f} s"
