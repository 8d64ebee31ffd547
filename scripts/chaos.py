"""Chaos run: many appointments, random Paubox faults, daemons killed with SIGKILL; then count per key.

Starts the FHIR test server (N generated Patients and N booked Appointments a few days ahead), the Paubox
sandbox with random faults (`connector sandbox --chaos`), and R `connector run` daemons on one ledger. While
the emails go out it kills a random daemon with SIGKILL K times and restarts it. When every expected
notification is final in the ledger (sent, failed, in_doubt, skipped, cancelled), or the timeout passes, it
lets webhooks settle, stops the daemons with SIGTERM and compares what the sandbox accepted, per key, with
the ledger. Exit 0 only when no email was accepted twice and none is silently missing.

Run it as `./scripts/chaos --help`. Everything runs on 127.0.0.1; every process it starts is stopped on
any exit (also Ctrl-C and SIGTERM); its files stay in the temp folder it prints.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import httpx
from sqlalchemy import text

from connector.ledger.engine import make_engine

ROOT = Path(__file__).resolve().parent.parent
CONNECTOR = ROOT / ".venv" / "bin" / "connector"
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_CONNINFO = "host=127.0.0.1 port=5432 dbname=test user=postgres connect_timeout=5"
SOURCE, MAPPING = "ehr", "appointment-booked"
FINAL = ("sent", "failed", "in_doubt", "skipped", "cancelled")
UNFINISHED = ("pending", "sending")
WEBHOOK_REASON = "confirmed by a Paubox webhook"
API_KEY = "chaos-sandbox-key"  # the sandbox's made-up key; no real key is involved

EXIT_OK, EXIT_DUPLICATE_OR_LOSS, EXIT_USAGE, EXIT_UNFINISHED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

HELP = (
    __doc__.split("\n\nRun it as")[0]
    + """

What is counted (per appointment: each gives exactly one expected notification, key
ehr:appointment-booked:<appointment id>|booked|<start>|<patient id>):
  sent once            the sandbox accepted its email exactly once
  duplicates           the sandbox accepted it more than once                       -> exit 1
  lost                 the sandbox never accepted it, and the ledger does not show it as
                       in_doubt or failed with a reason (missing row, sent, skipped, cancelled) -> exit 1
  unfinished           still pending/sending in the ledger when the timeout passed  -> exit 3
  in_doubt             ledger state in_doubt (visible to a person: not a loss); split into
                       accepted by the sandbox (a webhook was dropped or missed) and never accepted
  resolved by webhook  ledger reason "confirmed by a Paubox webhook"
  failed, skipped      ledger states, with their reasons grouped

Faults (per send request the sandbox draws one; rates are fractions):
  --server-error       HTTP 500, message not accepted (default 0.025)
  --accepted-500       message accepted, then HTTP 500 (default 0.025; with the above: 5 % HTTP 500)
  --rate-limit         HTTP 429 with Retry-After: 1 (default 0.02)
  --hang               accepted, then no answer for --hang-seconds (default 0.01); the daemons' read
                       timeout is 2 s, so the notification becomes in_doubt until a webhook confirms it
  --drop-webhook       a webhook event is never sent (default 0.01)
Webhooks go to replica 1 only; while it is down (killed) they are lost too, as with Paubox.

Files in the work folder: fhir-data/ (the generated resources), mappings/ (appointment-booked only),
config-<i>.yaml and replica-<i>.log per daemon, fhir-server.log, paubox-sandbox.log, connector.db
(SQLite), ledger.csv (key, state, reason, attempts, resends, tracking id, times the sandbox accepted it),
result.txt (the table), run.json (the options, with the seed).

Exit status: 0 no duplicate and nothing lost; 1 a duplicate or a loss; 2 bad options or a setup
failure; 3 the timeout passed with notifications unfinished; 130 interrupted.

Notes: the seed fixes the data, the fault sequence and the kill plan, not the timing, so a run is
not exactly repeatable. A daemon killed with SIGKILL leaves its claimed notifications leased for
`dispatch.lease` (20 s in the config the harness writes) before another daemon takes them (pending) or
marks them in_doubt (sending); a restarted SQLite daemon takes them back at once (it is the only one).
"""
)


# -- options -------------------------------------------------------------------------------------------


def rate(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction between 0 and 1")
    return number


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/chaos", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run = parser.add_argument_group("the run")
    run.add_argument(
        "--appointments",
        type=positive,
        default=200,
        metavar="N",
        help="generated booked appointments, one patient each (default 200)",
    )
    run.add_argument(
        "--kills",
        type=int,
        default=5,
        metavar="K",
        help="SIGKILLs of a random daemon at random moments while sending, each followed by a restart (default 5)",
    )
    run.add_argument(
        "--replicas",
        type=positive,
        default=1,
        metavar="R",
        help="`connector run` daemons sharing the ledger; more than 1 needs --postgres (default 1)",
    )
    run.add_argument(
        "--postgres",
        action="store_true",
        help="ledger on PostgreSQL (database `test` on 127.0.0.1:5432, user postgres, trust auth) in "
        "a fresh schema, dropped at the end; default: SQLite in the work folder",
    )
    run.add_argument("--keep-schema", action="store_true", help="with --postgres: do not drop the schema")
    run.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for the data, the sandbox's faults and the kill plan (default: random, printed)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=900,
        metavar="SECONDS",
        help="give up waiting for final states after this long (default 900); stopping adds at most about a minute",
    )
    run.add_argument("--batch-size", type=positive, default=50, help="dispatch.batch_size of the daemons (default 50)")
    run.add_argument(
        "--concurrency",
        type=positive,
        default=8,
        help="dispatch.concurrency of the daemons: send requests in flight per daemon (default 8)",
    )
    run.add_argument(
        "--page-size", type=positive, default=100, help="sources.ehr.page_size of the daemons (default 100)"
    )
    run.add_argument(
        "--settle",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="wait this long for webhooks after the last notification is final (default 3)",
    )
    faults = parser.add_argument_group("sandbox faults (fractions of send requests)")
    faults.add_argument("--latency-ms", type=float, default=50, help="delay of every send (default 50)")
    faults.add_argument("--server-error", type=rate, default=0.025, help="HTTP 500, not accepted (default 0.025)")
    faults.add_argument("--accepted-500", type=rate, default=0.025, help="accepted, then HTTP 500 (default 0.025)")
    faults.add_argument("--rate-limit", type=rate, default=0.02, help="HTTP 429, Retry-After: 1 (default 0.02)")
    faults.add_argument("--hang", type=rate, default=0.01, help="accepted, then no answer (default 0.01)")
    faults.add_argument("--hang-seconds", type=float, default=10, help="how long a hang lasts (default 10)")
    faults.add_argument("--drop-webhook", type=rate, default=0.01, help="webhook event never sent (default 0.01)")
    args = parser.parse_args(argv)
    if args.replicas > 1 and not args.postgres:
        parser.error("--replicas above 1 needs --postgres: a SQLite ledger serves one process")
    if args.kills < 0:
        parser.error("--kills must be 0 or more")
    if args.server_error + args.accepted_500 + args.rate_limit + args.hang > 1:
        parser.error("the fault rates add up to more than 1")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10**6)
    return args


# -- processes -----------------------------------------------------------------------------------------


class Interrupted(Exception):
    """SIGTERM (or SIGINT) asked the harness to stop."""


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    terminated: bool = False

    def start(self, note: str) -> None:
        self.close_log()
        self.terminated = False
        self.log = self.log_path.open("ab")
        self.log.write(f"\n===== chaos: {note} at {datetime.now(UTC).isoformat()} =====\n".encode())
        self.log.flush()
        # Own session: a Ctrl-C in the terminal reaches the harness only, which then stops everything in order.
        self.process = subprocess.Popen(  # noqa: S603 - our own CLI, arguments built here
            self.argv,
            cwd=self.log_path.parent,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> None:
        """SIGTERM, once: a second one during the graceful stop would hit Python's default handler."""
        if self.process is not None and self.process.poll() is None and not self.terminated:
            self.terminated = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, grace: float) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds. Returns the exit status (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait(timeout=30)
        self.close_log()
        return self.process.returncode

    def close_log(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


def wait_http(url: str, child: Child, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not child.alive():
            raise SetupError(f"{child.name} exited; see {child.log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.2)
    raise SetupError(f"{child.name} did not answer at {url} within {seconds:.0f} s; see {child.log_path}")


class SetupError(Exception):
    pass


# -- the world: data, mappings, config, ledger ---------------------------------------------------------


def appointment_id(index: int) -> str:
    return f"chaos-{index:06d}"


def write_resources(folder: Path, count: int, rng: random.Random, now: datetime) -> list[str]:
    """N Patients (example.org addresses, made-up names) and N booked Appointments 2-6 days ahead, as two
    Bundles. Returns the appointment ids."""
    folder.mkdir()
    base = now.replace(second=0, microsecond=0) + timedelta(days=2)
    patients: list[dict[str, object]] = []
    appointments: list[dict[str, object]] = []
    for index in range(1, count + 1):
        pid = f"chaos-p{index:06d}"
        patients.append(
            {
                "resourceType": "Patient",
                "id": pid,
                "name": [{"use": "official", "given": [f"Chaos{index}"], "family": "Testperson"}],
                "telecom": [{"system": "email", "value": f"chaos.patient.{index}@example.org", "use": "home"}],
            }
        )
        start = base + timedelta(minutes=15 * rng.randrange(0, 4 * 24 * 4))
        appointments.append(
            {
                "resourceType": "Appointment",
                "id": appointment_id(index),
                "status": "booked",
                "serviceType": [{"text": "Check-up"}],
                "start": start.isoformat().replace("+00:00", "Z"),
                "end": (start + timedelta(minutes=30)).isoformat().replace("+00:00", "Z"),
                "participant": [
                    {"actor": {"reference": f"Patient/{pid}"}, "required": "required", "status": "accepted"}
                ],
            }
        )
    for name, resources in (("patients", patients), ("appointments", appointments)):
        bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
        (folder / f"{name}.json").write_text(json.dumps(bundle), encoding="utf-8")
    return [appointment_id(index) for index in range(1, count + 1)]


def write_mappings(folder: Path) -> None:
    """Only the shipped appointment-booked mapping (and the layouts it extends): one email per appointment."""
    folder.mkdir()
    for path in (ROOT / "mappings").iterdir():
        if path.name.startswith((f"{MAPPING}.", "_layout")):
            shutil.copy2(path, folder / path.name)


def write_config(
    path: Path, *, fhir_port: int, paubox_port: int, server_port: int, ledger_url: str, args: argparse.Namespace
) -> None:
    path.write_text(
        f"""\
# Written by scripts/chaos. Short timeouts so that hangs become in_doubt quickly; policy hold so that the
# result measures exactly-once (an in_doubt notification is never resent without a person).
sources:
  {SOURCE}:
    base_url: http://127.0.0.1:{fhir_port}
    start_from: 2000-01-01T00:00:00Z
    interval: 5s
    overlap: 1s        # the test server stamps strictly increasing times and nothing commits late
    sweep: 0s          # every poll reads the (short) overlap
    page_size: {args.page_size}
    timezone: America/New_York
mappings: mappings
ledger:
  url: "{ledger_url}"
delivery:
  from: "Chaos Clinic <appointments@clinic.example.org>"
  paubox:
    base_url: http://127.0.0.1:{paubox_port}/v1/sandbox
    api_key: ${{PAUBOX_API_KEY}}
    connect_timeout: 2s
    read_timeout: 2s
    webhook_token: ${{PAUBOX_WEBHOOK_TOKEN}}
dispatch:
  interval: 1s
  concurrency: {args.concurrency}
  batch_size: {args.batch_size}
  retry_backoff: 1s
  retry_backoff_max: 5s
  circuit_cooldown: 5s
  rate_limit_pause: 1s
  lease: 20s                              # a killed replica's claims come back after 20 s, not 5 min
  in_doubt:
    policy: hold
    wait: 5s
server:
  host: 127.0.0.1
  port: {server_port}
""",
        encoding="utf-8",
    )


def create_schema() -> str:
    import psycopg

    schema = f"chaos_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.OperationalError as exc:
        raise SetupError(
            f"PostgreSQL is not reachable on 127.0.0.1:5432 (database test, user postgres): "
            f"{type(exc).__name__}; start it (./scripts/test does) or run without --postgres"
        ) from None
    return schema


def drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@dataclass(frozen=True)
class Row:
    key: str
    state: str
    reason: str | None
    attempts: int
    resends: int
    tracking_id: str | None


class Ledger:
    """Direct reads of the `notification` table (the harness never writes to it)."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)

    def states(self) -> Counter[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT state, count(*) FROM notification WHERE mapping = :m GROUP BY state"), {"m": MAPPING}
            )
            return Counter({state: int(count) for state, count in rows})

    def rows(self) -> list[Row]:
        with self.engine.connect() as conn:
            result = conn.execute(
                text("SELECT key, state, reason, attempts, resends, tracking_id FROM notification ORDER BY id")
            )
            return [Row(*r) for r in result]

    def close(self) -> None:
        self.engine.dispose()


def appointment_of(key: str) -> str | None:
    """The appointment id in a key `ehr:appointment-booked:<id>|booked|…`, or None for another key."""
    prefix = f"{SOURCE}:{MAPPING}:"
    return key[len(prefix) :].split("|", 1)[0] if key.startswith(prefix) else None


# -- the verdict (pure) --------------------------------------------------------------------------------


@dataclass
class Result:
    expected: int = 0
    sent_once: int = 0
    duplicates: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    in_doubt_accepted: int = 0
    in_doubt_not_accepted: int = 0
    in_doubt_reasons: Counter[str] = field(default_factory=Counter)
    resolved_by_webhook: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    failed_but_accepted: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    states: Counter[str] = field(default_factory=Counter)
    unexpected_keys: int = 0

    @property
    def in_doubt(self) -> int:
        return self.in_doubt_accepted + self.in_doubt_not_accepted

    def exit_status(self) -> int:
        if self.duplicates or self.lost:
            return EXIT_DUPLICATE_OR_LOSS
        return EXIT_UNFINISHED if self.unfinished else EXIT_OK


def _short(reason: str | None) -> str:
    return re.sub(r"\s+", " ", reason or "(no reason)")[:100]


def analyse(expected: Sequence[str], rows: Sequence[Row], per_key: dict[str, int]) -> Result:
    """Compare what the sandbox accepted (per key) with the ledger, per expected appointment id."""
    result = Result(expected=len(expected))
    wanted = set(expected)
    accepted: Counter[str] = Counter()
    for key, count in per_key.items():
        aid = appointment_of(key)
        if aid in wanted:
            accepted[aid] += count
        else:
            result.unexpected_keys += count
    by_appointment: dict[str, list[Row]] = {}
    for row in rows:
        aid = appointment_of(row.key)
        if aid in wanted:
            by_appointment.setdefault(aid, []).append(row)
    for aid in expected:
        times = accepted[aid]
        mine = by_appointment.get(aid, [])
        states = {r.state for r in mine}
        result.states.update(r.state for r in mine)
        for row in mine:
            if row.reason and row.reason.startswith(WEBHOOK_REASON):
                result.resolved_by_webhook += 1
            if row.state == "failed":
                result.failed[_short(row.reason)] += 1
                result.failed_but_accepted += times > 0
            elif row.state == "skipped":
                result.skipped[_short(row.reason)] += 1
            elif row.state == "in_doubt":
                result.in_doubt_reasons[_short(row.reason)] += 1
                if times:
                    result.in_doubt_accepted += 1
                else:
                    result.in_doubt_not_accepted += 1
        if times > 1:
            result.duplicates.append(aid)
        elif times == 1:
            result.sent_once += 1
        if states & set(UNFINISHED):
            result.unfinished.append(aid)
        elif times == 0 and not any(r.state == "in_doubt" or (r.state == "failed" and r.reason) for r in mine):
            result.lost.append(aid)
    return result


def table(
    result: Result,
    *,
    elapsed: float,
    kills: int,
    planned_kills: int,
    crashes: int,
    received: int,
    accepted: int,
    title: str,
) -> str:
    lines = [title, ""]

    def row(label: str, value: object, note: str = "") -> None:
        lines.append(f"  {label:<22}{value!s:>8}" + (f"   {note}" if note else ""))

    row("expected", result.expected)
    row("sent once", result.sent_once)
    row("duplicates", len(result.duplicates))
    row("lost", len(result.lost))
    row("unfinished", len(result.unfinished), "pending/sending when the run ended")
    row(
        "in_doubt",
        result.in_doubt,
        f"accepted by the sandbox: {result.in_doubt_accepted}, never accepted: {result.in_doubt_not_accepted}",
    )
    for reason, count in result.in_doubt_reasons.most_common():
        lines.append(f"  {'':<22}{count:>8}   {reason}")
    row("resolved by webhook", result.resolved_by_webhook)
    row(
        "failed",
        sum(result.failed.values()),
        f"of which the sandbox accepted: {result.failed_but_accepted}" if result.failed else "",
    )
    for reason, count in result.failed.most_common():
        lines.append(f"  {'':<22}{count:>8}   {reason}")
    row("skipped", sum(result.skipped.values()))
    for reason, count in result.skipped.most_common():
        lines.append(f"  {'':<22}{count:>8}   {reason}")
    row("ledger states", "", ", ".join(f"{s} {n}" for s, n in sorted(result.states.items())) or "no rows")
    row(
        "send requests",
        received,
        f"sandbox accepted {accepted} message(s)"
        + (f", {result.unexpected_keys} under unexpected keys" if result.unexpected_keys else ""),
    )
    row("elapsed seconds", f"{elapsed:.1f}")
    row(
        "kills done",
        kills,
        f"of {planned_kills}" + (f"; daemon exits the harness did not cause: {crashes}" if crashes else ""),
    )
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    work: Path
    children: list[Child] = field(default_factory=list)
    daemons: list[Child] = field(default_factory=list)
    schema: str | None = None
    ledger: Ledger | None = None
    fhir_url: str = ""
    paubox_url: str = ""
    began: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        print(f"chaos [{time.monotonic() - self.began:6.0f} s]: {message}", file=sys.stderr, flush=True)

    def env(self, token: str) -> dict[str, str]:
        return {
            **os.environ,
            "PAUBOX_API_KEY": API_KEY,
            "PAUBOX_WEBHOOK_TOKEN": token,
            "CONNECTOR_LOG_FORMAT": "console",
            "CONNECTOR_LOG_LEVEL": "info",
        }

    def child(self, name: str, argv: list[str], log_name: str, env: dict[str, str]) -> Child:
        child = Child(name, argv, self.work / log_name, env)
        self.children.append(child)
        return child

    def start(self) -> list[str]:
        """Data, servers, config, schema, daemons. Returns the expected appointment ids."""
        args = self.args
        rng = random.Random(args.seed)
        expected = write_resources(self.work / "fhir-data", args.appointments, rng, datetime.now(UTC))
        write_mappings(self.work / "mappings")
        token = secrets.token_urlsafe(16)
        env = self.env(token)
        fhir_port, paubox_port = free_port(), free_port()
        ports = [free_port() for _ in range(args.replicas)]
        chaos = ",".join(
            f"{name}={getattr(args, name)}"
            for name in ("server_error", "accepted_500", "rate_limit", "hang", "hang_seconds", "drop_webhook")
        )
        fhir = self.child(
            "FHIR test server",
            [
                str(CONNECTOR),
                "sandbox",
                "fhir",
                "--port",
                str(fhir_port),
                "--no-sample-data",
                "--data",
                str(self.work / "fhir-data"),
            ],
            "fhir-server.log",
            env,
        )
        paubox = self.child(
            "Paubox sandbox",
            [
                str(CONNECTOR),
                "sandbox",
                "--port",
                str(paubox_port),
                "--latency-ms",
                str(args.latency_ms),
                "--chaos",
                f"{chaos},seed={args.seed}",
                "--webhook-url",
                f"http://127.0.0.1:{ports[0]}/webhooks/paubox/{token}",
            ],
            "paubox-sandbox.log",
            env,
        )
        fhir.start("start")
        paubox.start("start")
        self.fhir_url, self.paubox_url = f"http://127.0.0.1:{fhir_port}", f"http://127.0.0.1:{paubox_port}"
        wait_http(f"{self.fhir_url}/metadata", fhir, 120)
        wait_http(f"{self.paubox_url}/_sandbox/stats", paubox)

        if args.postgres:
            self.schema = create_schema()
            ledger_url = f"{PG_SERVER}?options=-csearch_path%3D{self.schema}"
        else:
            ledger_url = "sqlite:///connector.db"
        for index, port in enumerate(ports, start=1):
            write_config(
                self.work / f"config-{index}.yaml",
                fhir_port=fhir_port,
                paubox_port=paubox_port,
                server_port=port,
                ledger_url=ledger_url,
                args=args,
            )
        upgrade = subprocess.run(  # noqa: S603 - our own CLI, arguments built here
            [str(CONNECTOR), "db", "upgrade", "--config", str(self.work / "config-1.yaml")],
            cwd=self.work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if upgrade.returncode != 0:
            raise SetupError(f"connector db upgrade failed:\n{upgrade.stdout}{upgrade.stderr}")
        self.ledger = Ledger(ledger_url if args.postgres else f"sqlite:///{self.work / 'connector.db'}")
        for index in range(1, len(ports) + 1):
            daemon = self.child(
                f"replica {index}",
                [str(CONNECTOR), "run", "--config", str(self.work / f"config-{index}.yaml")],
                f"replica-{index}.log",
                env,
            )
            daemon.start("start")
            self.daemons.append(daemon)
        for daemon, port in zip(self.daemons, ports, strict=True):
            wait_http(f"http://127.0.0.1:{port}/livez", daemon)
        return expected

    def progress(self) -> tuple[int, Counter[str]]:
        assert self.ledger is not None
        states = self.ledger.states()
        return sum(states[s] for s in FINAL), states

    def chaos(self, expected: int) -> tuple[int, int, bool]:
        """Kill and restart daemons while sending, until every notification is final and every kill is done,
        or the timeout. Returns (kills done, unexpected daemon exits, finished)."""
        args = self.args
        rng = random.Random(args.seed + 1)
        thresholds = sorted(int(rng.uniform(0, 0.9) * expected) for _ in range(args.kills))
        deadline = time.monotonic() + args.timeout
        kills = crashes = 0
        next_kill_after = time.monotonic() + rng.uniform(0.5, 3)
        last_report = 0.0
        while time.monotonic() < deadline:
            final, states = self.progress()
            for daemon in self.daemons:
                if not daemon.alive():
                    crashes += 1
                    if crashes > 5 * len(self.daemons):
                        raise SetupError(f"daemons keep exiting by themselves; see {daemon.log_path}")
                    self.log(
                        f"{daemon.name} exited by itself (status {daemon.process and daemon.process.returncode});"
                        f" restarting it; see {daemon.log_path}"
                    )
                    daemon.start("restart after an exit the harness did not cause")
            if kills < len(thresholds) and final >= thresholds[kills] and time.monotonic() >= next_kill_after:
                victim = rng.choice(self.daemons)
                time.sleep(rng.uniform(0, 0.5))
                victim.kill()
                kills += 1
                self.log(f"SIGKILL {victim.name} ({kills}/{args.kills}) at {final}/{expected} final")
                time.sleep(rng.uniform(0.2, 1.5))
                victim.start(f"restart after SIGKILL {kills}")
                next_kill_after = time.monotonic() + rng.uniform(0.5, 3)
            elif final >= expected and kills >= len(thresholds):
                return kills, crashes, True
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                self.log(
                    f"{final}/{expected} final ({', '.join(f'{s} {n}' for s, n in sorted(states.items()))}), "
                    f"kills {kills}/{args.kills}"
                )
            time.sleep(0.3)
        self.log(f"timeout after {args.timeout:.0f} s")
        return kills, crashes, False

    def stop_daemons(self) -> None:
        for daemon in self.daemons:
            daemon.terminate()
        for daemon in self.daemons:
            status = daemon.stop(grace=40)
            if status not in (0, None, -signal.SIGKILL):
                self.log(f"{daemon.name} stopped with status {status}; see {daemon.log_path}")

    def cleanup(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                child.stop(grace=45 if child in self.daemons else 10)
        if self.ledger is not None:
            self.ledger.close()
        if self.schema is not None:
            if self.args.keep_schema:
                self.log(f"kept PostgreSQL schema {self.schema}")
            else:
                try:
                    drop_schema(self.schema)
                except Exception as exc:  # noqa: BLE001 - report and go on: the rest must still be cleaned up
                    self.log(f"could not drop schema {self.schema}: {type(exc).__name__}")


def write_ledger_csv(path: Path, rows: Sequence[Row], per_key: dict[str, int]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "state", "reason", "attempts", "resends", "tracking_id", "sandbox_accepted"])
        for r in rows:
            writer.writerow(
                [r.key, r.state, r.reason or "", r.attempts, r.resends, r.tracking_id or "", per_key.get(r.key, 0)]
            )


def details(result: Result, rows: Sequence[Row], per_key: dict[str, int]) -> Iterator[str]:
    """The ledger rows and sandbox counts of every duplicate, lost or unfinished appointment (first 20 each)."""
    by_appointment: dict[str, list[Row]] = {}
    for row in rows:
        by_appointment.setdefault(appointment_of(row.key) or "", []).append(row)
    for label, ids in (("DUPLICATE", result.duplicates), ("LOST", result.lost), ("unfinished", result.unfinished)):
        for aid in ids[:20]:
            counts = {k: v for k, v in per_key.items() if appointment_of(k) == aid}
            ledger = [
                f"{r.key} state={r.state} attempts={r.attempts} resends={r.resends} reason={r.reason!r}"
                for r in by_appointment.get(aid, [])
            ] or ["no ledger row"]
            yield f"{label} Appointment/{aid}: sandbox accepted {counts or 0}; ledger: {'; '.join(ledger)}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="connector-chaos-"))
    run = Run(args, work)
    (work / "run.json").write_text(json.dumps(vars(args), indent=2), encoding="utf-8")
    backend = f"PostgreSQL, {args.replicas} replica(s)" if args.postgres else "SQLite, 1 replica"
    title = (
        f"chaos: {args.appointments} appointments, {args.kills} kills, {backend}, seed {args.seed}, "
        f"faults 500 {args.server_error}+{args.accepted_500} accepted, 429 {args.rate_limit}, "
        f"hang {args.hang}, dropped webhooks {args.drop_webhook}, latency {args.latency_ms:g} ms"
    )
    run.log(f"work folder {work}")
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        expected = run.start()
        run.log(f"{len(run.daemons)} daemon(s) running; sending {len(expected)} notifications")
        kills, crashes, finished = run.chaos(len(expected))
        time.sleep(args.settle)  # webhooks of the last acceptances reach replica 1
        elapsed = time.monotonic() - run.began
        run.stop_daemons()
        stats = httpx.get(f"{run.paubox_url}/_sandbox/stats", timeout=30).json()
        per_key: dict[str, int] = stats["per_key"]
        assert run.ledger is not None
        rows = run.ledger.rows()
        write_ledger_csv(work / "ledger.csv", rows, per_key)
        result = analyse(expected, rows, per_key)
        report = table(
            result,
            elapsed=elapsed,
            kills=kills,
            planned_kills=args.kills,
            crashes=crashes,
            received=stats["received"],
            accepted=stats["accepted"],
            title=title,
        )
        notes = list(details(result, rows, per_key))
        if not finished:
            notes.append(f"TIMEOUT: not every notification was final after {args.timeout:.0f} s")
        (work / "result.txt").write_text(report + "\n" + "\n".join(notes) + "\n", encoding="utf-8")
        print(report)
        for note in notes:
            print(note)
        print(f"\nwork folder: {work}")
        return result.exit_status()
    except SetupError as exc:
        print(f"chaos: setup failed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (Interrupted, KeyboardInterrupt):
        run.log("interrupted; stopping everything")
        return EXIT_INTERRUPTED
    finally:
        # No second Ctrl-C half-way through the cleanup.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        run.cleanup()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        run.log(f"stopped every process it started; files in {work}")


if __name__ == "__main__":
    sys.exit(main())
