"""How fast the operator console's pages read a large ledger: seeds 1,000,000 notifications (a year of them,
in every state) into SQLite and into PostgreSQL (a private schema, dropped afterwards), then times what the
overview reads and a few filtered searches, each the median of several runs. Figures only, targets beside
them; nothing fails on a figure. Not part of the test run (seeding takes minutes).

    .venv/bin/python -m bench.console                 # 1,000,000 rows, SQLite and PostgreSQL
    .venv/bin/python -m bench.console --rows 100000 --only sqlite
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from connector.config import load_config
from connector.ledger import migrate
from connector.ledger.console import Search
from connector.ledger.engine import make_engine
from connector.ledger.sql import SqlLedger
from connector.models import State
from connector.testing import pg_schema, sqlite_url, write_config
from connector.web.console import facts

TARGET = 1.0  # seconds: "well under a second" per page
STATES = [State.SENT] * 85 + [State.SKIPPED] * 5 + [State.CANCELLED] * 3 + [State.PENDING] * 4
STATES += [State.FAILED] * 2 + [State.IN_DOUBT]
COLUMNS = (
    "key", "source", "mapping", "event", "resource_type", "resource_id", "resource_version", "patient_id",
    "state", "reason", "attempts", "due_at", "tracking_id", "created_at", "updated_at", "sent_at", "resends",
    "delivery_rank",
)  # fmt: skip
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def rows(count: int) -> Iterator[tuple[Any, ...]]:
    """A year of notifications, oldest first; about 3 per appointment, one patient per 2 appointments."""
    mappings = ("appointment-booked", "appointment-reminder", "appointment-cancelled")
    for i in range(count):
        at = (NOW - timedelta(days=365) + timedelta(seconds=i * 365 * 86400 // count)).replace(tzinfo=None)
        state = STATES[(i * 37) % len(STATES)] if i < count - count // 100 else State.PENDING
        appointment = f"appt-{i // 3}"
        sent = state is State.SENT
        yield (
            f"ehr:{mappings[i % 3]}:{appointment}:{i}", "ehr", mappings[i % 3], "booked", "Appointment",
            appointment, "1", f"pat-{i // 6}", state.value,
            "the patient has no email address" if state is State.SKIPPED else None, 1 if sent else 0,
            at + timedelta(days=2) if state is State.PENDING else at, f"trk-{i}" if sent else None,
            at - timedelta(days=3), at, at if sent else None, 0, 3 if sent else 0,
        )  # fmt: skip


def seed(engine: Engine, count: int) -> float:
    """Bulk-insert `count` rows (COPY on PostgreSQL, executemany in chunks on SQLite); seconds taken."""
    started = time.perf_counter()
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "postgresql":
            with cursor.copy(f"COPY notification ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in rows(count):
                    copy.write_row(row)
            raw.commit()
            cursor.execute("ANALYZE notification")
        else:
            marks = ", ".join("?" * len(COLUMNS))
            batch: list[tuple[Any, ...]] = []
            for row in rows(count):
                batch.append(tuple(v.isoformat(sep=" ") if isinstance(v, datetime) else v for v in row))
                if len(batch) == 50_000:
                    cursor.executemany(f"INSERT INTO notification ({', '.join(COLUMNS)}) VALUES ({marks})", batch)
                    batch.clear()
            if batch:
                cursor.executemany(f"INSERT INTO notification ({', '.join(COLUMNS)}) VALUES ({marks})", batch)
            raw.commit()
            cursor.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
    return time.perf_counter() - started


def timed(work: Callable[[], object], repeats: int = 5) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def measure(label: str, url: str, count: int, folder: Path) -> list[tuple[str, str, float, str]]:
    engine = make_engine(url)
    migrate.upgrade(engine)
    seconds = seed(engine, count)
    print(f"{label}: seeded {count:,} notifications in {seconds:.0f} s", flush=True)
    config = load_config(write_config(folder, "http://127.0.0.1:9", "http://127.0.0.1:9", ledger_url=url))
    ledger = SqlLedger(engine)
    console = ledger.console
    last_failed = console.search(Search(state=State.FAILED), None, 1)[0].id
    halfway, appointment, patient = last_failed // 2, f"appt-{count // 6}", f"pat-{count // 12}"
    window = Search(mapping="appointment-reminder", since=NOW - timedelta(days=100), until=NOW - timedelta(days=99))
    cases: list[tuple[str, Callable[[], object]]] = [
        ("overview (every query of the page)", lambda: facts.overview(config, ledger, NOW)),
        ("search: appointment id", lambda: console.search(Search(appointment_id=appointment), None, 51)),
        ("search: patient id", lambda: console.search(Search(patient_id=patient), None, 51)),
        ("search: state failed, first page", lambda: console.search(Search(state=State.FAILED), None, 51)),
        ("search: state failed, a page deep in", lambda: console.search(Search(state=State.FAILED), halfway, 51)),
        ("search: mapping + one day of due times", lambda: console.search(window, None, 51)),
        ("search: no filter, newest first", lambda: console.search(Search(), None, 51)),
        ("notification detail", lambda: console.detail(last_failed)),
        ("appointment view", lambda: console.appointment(appointment)),
    ]  # fmt: skip
    results = []
    for name, work in cases:
        median, found = timed(work)
        size = f"{len(found)} rows" if isinstance(found, list) else ""
        results.append((label, name, median, size))
        print(f"  {name:<42} {median * 1000:8.1f} ms  {size}", flush=True)
    engine.dispose()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    results: list[tuple[str, str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        folder = Path(tmp)
        if args.only in (None, "sqlite"):
            results += measure("SQLite", sqlite_url(folder / "ledger.db"), args.rows, folder)
        if args.only in (None, "postgresql"):
            with pg_schema(prefix="bench") as url:
                results += measure("PostgreSQL", url, args.rows, folder)
    print(f"\n{'ledger':<11} {'page':<42} {'median':>10}  target < {TARGET:.0f} s")
    for label, name, median, _ in results:
        print(f"{label:<11} {name:<42} {median * 1000:8.1f} ms  {'met' if median < TARGET else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
