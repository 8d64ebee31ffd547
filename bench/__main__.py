"""connector benchmark: start-up, end-to-end throughput, peak memory and latency, printed as one table.

Every figure comes from real processes on 127.0.0.1: the FHIR test server and the Paubox sandbox (the
package's own apps, served by uvicorn) each run in their own process, and each measurement of the connector
runs in a fresh process of its own (bench/workers.py), so that the two cores are shared honestly and the
memory figure is that process's alone. No pass/fail in code: figures, the targets beside them, and which
targets were met.

  0. start-up: `connector --version`, and `connector run --once` with nothing due;
  1. notifications/s, CPU per notification and peak RSS of `connector run --once` processes from their start
     to the last accepted message (sandbox: 50 ms per request + 1 ms per message), for the default config,
     tuned, one by one, PostgreSQL with 1 and 3 daemons, against a naive loop (bench/naive.py) that posts
     one message at a time and waits for each answer; the ledger's share of the CPU by profile;
 1b. the default config and tuned against a real FHIR server, sekmet-fhir from PyPI (installed into a
     virtual environment of its own under .cache/, run in its own process, its CPU reported apart);
  2. growth: the default config at N, 4N and 16N appointments;
  3. peak RSS (VmHWM) of a first poll of a large FHIR server (poll + plan + commit), then a bounded slice
     of sending through a mailer that accepts at once (no network);
  4. event → accepted latency: appointments written to the FHIR server at a steady rate while a
     daemon-like loop runs run_once every poll interval; latency = the sandbox's received_at minus the
     appointment's meta.lastUpdated;
  5. the same latency with `connector run` and a rest-hook Subscription on the FHIR test server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.parts import FULL, QUICK, Baseline, Sizes, latency, memory, real_server, subscriptions, throughput
from bench.rig import Processes, Rig
from bench.table import Report, busy_cpu_seconds, machine, mount_of, own_cpu_seconds, render


def compile_package() -> None:
    """The package's bytecode, as an installed wheel has it (pip compiles it at install), written once
    (`__pycache__`, ignored by git, or under PYTHONPYCACHEPREFIX): no measured process compiles ~130 modules
    again (about 0.2 s of CPU each time when PYTHONDONTWRITEBYTECODE is set, as in some development shells)."""
    package = Path(__file__).resolve().parent.parent / "connector"
    # compileall writes even under PYTHONDONTWRITEBYTECODE, where the children look (PYTHONPYCACHEPREFIX too)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)  # noqa: S603


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
    parser.add_argument("--repeats", type=int, help="unused; kept so that old command lines still run")
    parser.add_argument("--growth", type=int, help="N of the growth rows: N, 4N, 16N (default 1,000)")
    parser.add_argument("--no-postgres", action="store_true", help="leave out the PostgreSQL rows")
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
        "--only",
        choices=["throughput", "sekmet", "memory", "latency", "subscriptions"],
        action="append",
        help="run only these parts (repeatable)",
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
        growth=args.growth or base.growth,
    )
    parts = args.only or ["throughput", "sekmet", "memory", "latency", "subscriptions"]

    root = Path(tempfile.mkdtemp(prefix="connector-bench-"))
    shm = Path("/dev/shm")  # noqa: S108 - a private folder is made in it with mkdtemp
    ram = (
        Path(tempfile.mkdtemp(prefix="connector-bench-", dir=shm))
        if shm.is_dir() and mount_of(shm).startswith("tmpfs")
        else None
    )
    compile_package()
    procs = Processes(root)
    report = Report()
    started, busy0, own0 = time.monotonic(), busy_cpu_seconds(), own_cpu_seconds()
    load0 = Path("/proc/loadavg").read_text().split()[0]
    try:
        _, paubox = procs.server("paubox", "--latency-ms", "50", "--per-message-ms", "1")
        rig = Rig(procs, root, ram, paubox, args.page_size)
        baseline: Baseline | None = None
        if "throughput" in parts:
            baseline = throughput(rig, sizes, args, report)
        if "sekmet" in parts:
            real_server(rig, sizes, report, baseline)
        if "memory" in parts:
            memory(rig, sizes, report)
        if "latency" in parts:
            latency(rig, sizes, args, report)
        if "subscriptions" in parts:
            subscriptions(rig, sizes, report)
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
