"""End to end, as users run it: `connector run --once` in fresh processes, timed from the moment the process
is started to the last message the sandbox accepted (start-up, imports, migrations check, poll, plan,
ledger, rendering and sending all included), with the CPU time and peak RSS the kernel counted for the
process (os.wait4), beside the naive loop (bench/naive.py) measured the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.rig import PY, ROOT, Rig, poll_seconds, sandbox
from bench.table import log
from connector.testing import (
    API_KEY,
    PG_URL,
    USERNAME,
    HarnessError,
    cli,
    connector_argv,
    create_schema,
    drop_schema,
    environment,
    schema_url,
    sqlite_url,
    write_config,
)

TUNED = {"bulk": 50, "concurrency": 16, "batch_size": 500}
ONE_BY_ONE = {"bulk": 0, "concurrency": 32, "batch_size": 500}


@dataclass(frozen=True)
class Setting:
    label: str
    dispatch: dict[str, int] | None  # None: the product's defaults
    daemons: int = 1
    postgres: bool = False
    forever: bool = False  # `connector run` (dispatch every second), stopped once all was accepted


def _stop_when_done(rig: Rig, pids: list[int], expected: int, timeout: float) -> list[tuple[int, Any]]:
    """Wait until the sandbox accepted `expected` messages (or `timeout`), then SIGTERM the daemons and reap
    them (their CPU includes the graceful stop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sandbox(rig.paubox, "GET", "/_sandbox/stats")["accepted"] < expected:
        time.sleep(0.2)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    return _wait_all(pids, timeout=60)


@dataclass
class Measured:
    """What one end-to-end run gave: messages accepted, seconds from start to the last acceptance, CPU
    seconds and peak RSS (kB, the largest process) of the measured processes, FHIR requests served and the
    FHIR server's own CPU seconds meanwhile (its process, not in `cpu`), and when the first process's poll
    ended (seconds from the start, by its `poll.done` log line)."""

    sent: int
    wall: float
    cpu: float
    rss_kb: int
    fhir_requests: int
    most_copies: int
    problem: str = ""
    server_cpu: float | None = None
    poll: float | None = None

    @property
    def rate(self) -> float:
        return self.sent / self.wall if self.wall > 0 else 0.0

    @property
    def cpu_ms(self) -> float:
        return self.cpu * 1000 / self.sent if self.sent else float("nan")


def _wait_all(pids: list[int], timeout: float) -> list[tuple[int, Any]]:
    """(exit code, rusage) of each child once it ended; SIGKILL for those still running after `timeout`."""
    deadline, done = time.monotonic() + timeout, dict[int, tuple[int, Any]]()
    while len(done) < len(pids):
        for pid in pids:
            if pid in done:
                continue
            got, status, usage = os.wait4(pid, os.WNOHANG)
            if got:
                done[pid] = (os.waitstatus_to_exitcode(status), usage)
        if time.monotonic() > deadline:
            for pid in pids:
                if pid not in done:
                    os.kill(pid, signal.SIGKILL)
                    _, status, usage = os.wait4(pid, 0)
                    done[pid] = (-9, usage)
        time.sleep(0.01)
    return [done[pid] for pid in pids]


def _spawn(argv: list[str], cwd: Path, log_path: Path, env: dict[str, str]) -> int:
    with log_path.open("ab") as out:
        process = subprocess.Popen(  # noqa: S603 - our own programs
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    process.returncode = 0  # reaped by _wait_all (os.wait4), not by Popen
    return process.pid


def _accepted(rig: Rig, fhir: str, started: float) -> tuple[int, float, int, int, float]:
    """Messages accepted, seconds from `started` to the last, most copies of one message, FHIR requests
    served and the FHIR server's CPU seconds so far."""
    stats = sandbox(rig.paubox, "GET", "/_sandbox/stats")
    last = stats.get("last_received_at")
    wall = datetime.fromisoformat(last).timestamp() - started if last else 0.0
    served = sandbox(fhir, "GET", "/_bench/requests")
    copies = max(stats["per_key"].values(), default=0)
    return stats["accepted"], wall, copies, int(served["requests"]), float(served["cpu"])


def _reset(rig: Rig, fhir: str) -> float:
    """Empty the sandbox and the FHIR server's request count; the FHIR server's CPU seconds so far."""
    sandbox(rig.paubox, "DELETE", "/_sandbox/messages")
    return float(sandbox(fhir, "DELETE", "/_bench/requests")["cpu"])


def connector_run(rig: Rig, fhir: str, setting: Setting, expected: int, name: str) -> Measured:
    """`setting.daemons` processes of `connector run --once` started at once on one ledger."""
    folder = rig.root / name
    folder.mkdir(parents=True, exist_ok=True)
    schema = create_schema(PG_URL, prefix="bench") if setting.postgres else None
    ledger = schema_url(PG_URL, schema) if schema else sqlite_url(folder / "ledger.db")
    settings: dict[str, int | None] = {"bulk": None, **(setting.dispatch or {})}  # None: the product's
    config = write_config(
        folder,
        fhir,
        rig.paubox,
        ledger_url=ledger,
        mappings=("appointment-booked",),
        optout=False,
        source={"page_size": None, "retries": None},
        dispatch={"interval": "1s" if setting.forever else "10s", "retry_backoff": None, **settings},
    )
    env = environment(PAUBOX_API_KEY=API_KEY)
    try:
        cli("db", "upgrade", "--config", config, cwd=folder)  # once, before: a cron user's ledger exists
        server_cpu = _reset(rig, fhir)
        argv = connector_argv("run", *([] if setting.forever else ["--once"]), "--config", str(config))
        started = time.time()
        pids = [_spawn(argv, folder, folder / f"daemon{i}.log", env) for i in range(setting.daemons)]
        if setting.forever:
            ended = _stop_when_done(rig, pids, expected, timeout=max(300.0, expected / 5))
        else:
            ended = _wait_all(pids, timeout=max(300.0, expected / 5))
    finally:
        if schema:
            drop_schema(schema, PG_URL)
    sent, wall, copies, requests, server_cpu_after = _accepted(rig, fhir, started)
    cpu = sum(usage.ru_utime + usage.ru_stime for _, usage in ended)
    codes = [code for code, _ in ended]
    problem = (
        ""
        if sent == expected and copies == 1 and not any(codes)
        else f" (CHECK: accepted {sent} of {expected}, most copies {copies}, exit codes {codes}; see {folder})"
    )
    rss = max(u.ru_maxrss for _, u in ended)
    polled = poll_seconds({"log": folder / "daemon0.log", "started_at": started})
    measured = Measured(sent, wall, cpu, rss, requests, copies, problem, server_cpu_after - server_cpu, polled)
    log(
        f"{name}: {sent} in {wall:.1f} s = {measured.rate:,.0f}/s, CPU {measured.cpu_ms:.2f} ms/notification, "
        f"RSS {measured.rss_kb / 1024:.0f} MB, {requests} FHIR requests{problem}"
    )
    return measured


def naive_run(rig: Rig, fhir: str, count: int) -> Measured:
    """The naive loop (bench/naive.py) over the first `count` appointments, in a fresh process."""
    _reset(rig, fhir)
    env = environment(PAUBOX_API_KEY=API_KEY)
    argv = [PY, "-m", "bench.naive", fhir, rig.paubox, USERNAME, str(count)]
    started = time.time()
    pid = _spawn(argv, ROOT, rig.root / "naive.log", env)
    ((code, usage),) = _wait_all([pid], timeout=120 + count)
    if code:
        raise HarnessError(f"the naive loop failed (exit {code}); see {rig.root / 'naive.log'}")
    sent, wall, copies, requests, _ = _accepted(rig, fhir, started)
    measured = Measured(sent, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, requests, copies)
    log(f"naive: {sent} in {wall:.1f} s = {measured.rate:.1f}/s, CPU {measured.cpu_ms:.2f} ms/notification")
    return measured


@dataclass
class Startup:
    version_wall: list[float]  # seconds, `connector --version`, each run
    idle_cpu: list[float]  # CPU seconds of `connector run --once` with nothing due, each run
    idle_wall: list[float]
    idle_rss_kb: int


def startup(rig: Rig, fhir: str, runs: int = 5) -> Startup:
    """`connector --version`, then `connector run --once` against an empty FHIR server (nothing due, the
    ledger upgraded beforehand): wall time, and CPU time as the kernel counted it."""
    folder = rig.root / "startup"
    config = rig.default_config(folder, fhir)
    cli("db", "upgrade", "--config", config, cwd=folder)
    env = environment(PAUBOX_API_KEY=API_KEY)
    version, idle, walls, rss = [], [], [], 0
    for index in range(runs):
        started = time.monotonic()
        pid = _spawn(connector_argv("--version"), folder, folder / "version.log", env)
        _wait_all([pid], timeout=60)
        version.append(time.monotonic() - started)
        started = time.monotonic()
        pid = _spawn(connector_argv("run", "--once", "--config", str(config)), folder, folder / f"idle{index}.log", env)
        ((code, usage),) = _wait_all([pid], timeout=120)
        if code:
            raise HarnessError(f"connector run --once exited {code}; see {folder / f'idle{index}.log'}")
        walls.append(time.monotonic() - started)
        idle.append(usage.ru_utime + usage.ru_stime)
        rss = max(rss, usage.ru_maxrss)
    log(f"start-up: --version {min(version):.2f} s; run --once idle CPU {min(idle):.2f} s")
    return Startup(version, idle, walls, rss)
