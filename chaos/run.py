"""The chaos run itself: servers, schema and daemons (through `connector.testing`), the kills, and `main`."""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from chaos.options import parse_args
from chaos.verdict import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    FINAL,
    analyse,
    details,
    table,
    write_ledger_csv,
)
from chaos.world import Ledger, write_daemon_config, write_resources
from connector.testing import (
    API_KEY,
    PG_URL,
    USERNAME,
    HarnessError,
    Process,
    cli,
    connector_argv,
    create_schema,
    drop_schema,
    environment,
    free_port,
    schema_url,
)

FAULTS = ("server_error", "accepted_500", "rate_limit", "hang", "hang_seconds", "drop_webhook")


class Interrupted(Exception):
    """SIGTERM (or SIGINT) asked the chaos run to stop."""


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


@dataclass
class Run:
    args: argparse.Namespace
    work: Path
    children: list[Process] = field(default_factory=list)
    daemons: list[Process] = field(default_factory=list)
    schema: str | None = None
    ledger: Ledger | None = None
    fhir_url: str = ""
    paubox_url: str = ""
    began: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        print(f"chaos [{time.monotonic() - self.began:6.0f} s]: {message}", file=sys.stderr, flush=True)

    def child(self, name: str, argv: list[str], log_name: str, env: dict[str, str]) -> Process:
        child = Process(argv, self.work / log_name, env=env, cwd=self.work, name=name)
        self.children.append(child)
        return child

    def start_servers(self, env: dict[str, str], webhook_url: str) -> None:
        """The FHIR test server with the generated data and the Paubox sandbox with its faults, each in its
        own process (`connector sandbox`)."""
        args = self.args
        fhir_port, paubox_port = free_port(), free_port()
        data = str(self.work / "fhir-data")
        fhir = self.child(
            "FHIR test server",
            connector_argv("sandbox", "fhir", "--port", str(fhir_port), "--no-sample-data", "--data", data),
            "fhir-server.log",
            env,
        )
        faults = ",".join(f"{name}={getattr(args, name)}" for name in FAULTS) + f",seed={args.seed}"
        paubox = self.child(
            "Paubox sandbox",
            connector_argv(
                *("sandbox", "--port", str(paubox_port), "--username", USERNAME),
                *("--latency-ms", str(args.latency_ms), "--chaos", faults, "--webhook-url", webhook_url),
            ),
            "paubox-sandbox.log",
            env,
        )
        fhir.start()
        paubox.start()
        self.fhir_url, self.paubox_url = f"http://127.0.0.1:{fhir_port}", f"http://127.0.0.1:{paubox_port}"
        fhir.wait_http(f"{self.fhir_url}/metadata", 120)
        paubox.wait_http(f"{self.paubox_url}/_sandbox/stats")

    def start(self) -> list[str]:
        """Data, servers, config, schema, daemons. Returns the expected appointment ids."""
        args = self.args
        expected = write_resources(self.work / "fhir-data", args.appointments, random.Random(args.seed), now())
        token = secrets.token_urlsafe(16)
        env = environment(
            PAUBOX_API_KEY=API_KEY,
            PAUBOX_WEBHOOK_TOKEN=token,
            CONNECTOR_LOG_FORMAT="console",
            CONNECTOR_LOG_LEVEL="info",
        )
        ports = [free_port() for _ in range(args.replicas)]
        self.start_servers(env, f"http://127.0.0.1:{ports[0]}/webhooks/paubox/{token}")
        if args.postgres:
            self.schema = create_schema(PG_URL, "chaos")
            ledger_url = schema_url(PG_URL, self.schema)
        else:
            ledger_url = "sqlite:///connector.db"
        configs = [
            write_daemon_config(
                self.work,
                index,
                fhir_url=self.fhir_url,
                paubox_url=self.paubox_url,
                server_port=port,
                ledger_url=ledger_url,
                args=args,
            )
            for index, port in enumerate(ports, start=1)
        ]
        cli("db", "upgrade", "--config", str(configs[0]), cwd=self.work, env=env)
        self.ledger = Ledger(ledger_url if args.postgres else f"sqlite:///{self.work / 'connector.db'}")
        for index, config in enumerate(configs, start=1):
            argv = connector_argv("run", "--config", str(config))
            self.daemons.append(self.child(f"replica {index}", argv, f"replica-{index}.log", env).start())
        for daemon, port in zip(self.daemons, ports, strict=True):
            daemon.wait_http(f"http://127.0.0.1:{port}/livez")
        return expected

    def progress(self) -> tuple[int, Counter[str]]:
        assert self.ledger is not None
        states = self.ledger.states()
        return sum(states[s] for s in FINAL), states

    def restart_exited(self, crashes: int) -> int:
        """Restart every daemon that exited by itself; returns the count of such exits so far."""
        for daemon in self.daemons:
            if not daemon.alive():
                crashes += 1
                if crashes > 5 * len(self.daemons):
                    raise HarnessError(f"daemons keep exiting by themselves; see {daemon.log_path}")
                self.log(
                    f"{daemon.name} exited by itself (status {daemon.returncode}); restarting it; see {daemon.log_path}"
                )
                daemon.start("restart after an exit the chaos run did not cause")
        return crashes

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
            crashes = self.restart_exited(crashes)
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
                    drop_schema(self.schema, PG_URL)
                except Exception as exc:  # noqa: BLE001 - report and go on: the rest must still be cleaned up
                    self.log(f"could not drop schema {self.schema}: {type(exc).__name__}")


def now() -> datetime:
    return datetime.now(UTC)


def title(args: argparse.Namespace) -> str:
    backend = f"PostgreSQL, {args.replicas} replica(s)" if args.postgres else "SQLite, 1 replica"
    return (
        f"chaos: {args.appointments} appointments, {args.kills} kills, {backend}, seed {args.seed}, "
        f"faults 500 {args.server_error}+{args.accepted_500} accepted, 429 {args.rate_limit}, "
        f"hang {args.hang}, dropped webhooks {args.drop_webhook}, latency {args.latency_ms:g} ms"
    )


def finish(run: Run, expected: list[str], kills: int, crashes: int, finished: bool) -> int:
    """Stop the daemons, compare, write ledger.csv and result.txt, print the table; the exit status."""
    args = run.args
    elapsed = time.monotonic() - run.began
    run.stop_daemons()
    stats = httpx.get(f"{run.paubox_url}/_sandbox/stats", timeout=30).json()
    per_key: dict[str, int] = stats["per_key"]
    assert run.ledger is not None
    rows = run.ledger.rows()
    write_ledger_csv(run.work / "ledger.csv", rows, per_key)
    result = analyse(expected, rows, per_key)
    report = table(
        result,
        elapsed=elapsed,
        kills=kills,
        planned_kills=args.kills,
        crashes=crashes,
        received=stats["received"],
        accepted=stats["accepted"],
        title=title(args),
    )
    notes = list(details(result, rows, per_key))
    if not finished:
        notes.append(f"TIMEOUT: not every notification was final after {args.timeout:.0f} s")
    (run.work / "result.txt").write_text(report + "\n" + "\n".join(notes) + "\n", encoding="utf-8")
    print(report)
    for note in notes:
        print(note)
    print(f"\nwork folder: {run.work}")
    return result.exit_status()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="connector-chaos-"))
    run = Run(args, work)
    (work / "run.json").write_text(json.dumps(vars(args), indent=2), encoding="utf-8")
    run.log(f"work folder {work}")
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        expected = run.start()
        run.log(f"{len(run.daemons)} daemon(s) running; sending {len(expected)} notifications")
        kills, crashes, finished = run.chaos(len(expected))
        time.sleep(args.settle)  # webhooks of the last acceptances reach replica 1
        return finish(run, expected, kills, crashes, finished)
    except HarnessError as exc:
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
