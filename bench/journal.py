"""What the journal costs the send path: the dispatcher's ledger writes (claim a batch, `sending`, record the
outcomes) timed per notification with the journal's INSERTs and with them left out, on SQLite and on
PostgreSQL (a private schema, dropped afterwards). Best of several rounds; figures only, nothing fails on
one. Not part of the test run.

    .venv/bin/python -m bench.journal                 # 20 batches of 50, three rounds, both databases
    .venv/bin/python -m bench.journal --only sqlite --batches 40
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from connector.ledger import SendResult, outbox
from connector.ledger.sql import SqlLedger
from connector.models import PlannedNotification, State
from connector.testing import migrated_engine, pg_schema, sqlite_url

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
BATCH = 50
TARGET = 1.0  # ms per notification: far below one Paubox request (tens to hundreds of ms)
PLANNED = PlannedNotification(
    key="",
    source="ehr",
    mapping="appointment-booked",
    event="booked",
    resource_type="Appointment",
    resource_id="",
    resource_version="1",
    patient_id="pat-1",
    due_at=NOW,
)


@contextmanager
def without_journal(skip: bool) -> Iterator[None]:
    """The outbox's journal writes left out (the send path as it was before the journal)."""
    names = vars(outbox)
    real = names["note"]
    if skip:
        names["note"] = lambda conn, entries: None
    try:
        yield
    finally:
        names["note"] = real


def one_round(ledger: SqlLedger, batches: int) -> float:
    """Milliseconds per notification for `batches` claim → sending → sent batches."""
    lease = NOW + timedelta(minutes=5)
    started, done = time.perf_counter(), 0
    for _ in range(batches):
        ids = [n.id for n in ledger.outbox.claim_due(NOW, BATCH, "bench", lease, NOW)]
        ledger.outbox.start_sending(ids, "bench", lease)
        ledger.outbox.finish([SendResult(i, State.SENT, "accepted", f"trk-{i}", NOW) for i in ids])
        done += len(ids)
    return (time.perf_counter() - started) * 1000 / max(done, 1)


def measure(url: str, label: str, batches: int, rounds: int) -> None:
    with migrated_engine(url) as engine:
        ledger = SqlLedger(engine)
        count = batches * BATCH * rounds * 2
        planned = [replace(PLANNED, key=f"ehr:booked:a{i}", resource_id=f"a{i}") for i in range(count)]
        for start in range(0, count, 1000):
            ledger.intake.add(planned[start : start + 1000])
        best: dict[bool, float] = {}
        for _ in range(rounds):
            for skip in (False, True):
                with without_journal(skip):
                    figure = one_round(ledger, batches)
                best[skip] = min(best.get(skip, figure), figure)
    print(
        f"{label:<11} with the journal {best[False]:.3f} ms/notification, without {best[True]:.3f} "
        f"(+{best[False] - best[True]:.3f}); target < {TARGET:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("sqlite", "postgresql"))
    options = parser.parse_args()
    if options.only != "postgresql":
        with tempfile.TemporaryDirectory() as folder:
            measure(sqlite_url(Path(folder) / "ledger.db"), "SQLite", options.batches, options.rounds)
    if options.only != "sqlite":
        with pg_schema(prefix="benchjournal") as url:
            measure(url, "PostgreSQL", options.batches, options.rounds)


if __name__ == "__main__":
    main()
