"""The intake role of the ledger (pages, seen versions, states, cursor, poll lock), run against SQLite and
the real PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

from connector.ledger import SeenVersion
from connector.ledger.sql import SqlLedger
from connector.models import State
from tests.factories import NOW, planned


def test_unique_key_decides_duplicates(ledger: SqlLedger) -> None:
    assert ledger.intake.add([planned("a"), planned("b")]) == ["a", "b"]
    assert ledger.intake.add([planned("a"), planned("c")]) == ["c"]
    assert ledger.reports.counts()[State.PENDING] == 3


def test_concurrent_inserts_of_one_key_keep_one(ledger: SqlLedger) -> None:
    results: list[list[str]] = []
    barrier = threading.Barrier(4)

    def insert() -> None:
        barrier.wait()
        results.append(ledger.intake.add([planned("same")]))

    threads = [threading.Thread(target=insert) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(len(r) for r in results) == [0, 0, 0, 1]


def test_record_page_is_atomic_and_cursor_never_goes_back(ledger: SqlLedger) -> None:
    seen = [SeenVersion("Appointment", "a", "1", NOW)]
    ledger.intake.record_page("ehr", [planned("a")], seen, NOW)
    ledger.intake.record_page("ehr", [], [], NOW - timedelta(hours=1))
    assert ledger.intake.cursor("ehr") == NOW
    ledger.intake.record_page("ehr", [], [], NOW + timedelta(seconds=1))
    assert ledger.intake.cursor("ehr") == NOW + timedelta(seconds=1)
    assert ledger.intake.new_versions("ehr", [("Appointment", "a", "1"), ("Appointment", "a", "2")]) == {
        ("Appointment", "a", "2")
    }
    assert ledger.intake.new_versions("other", [("Appointment", "a", "1")]) == {("Appointment", "a", "1")}


def test_problems_and_pruning(ledger: SqlLedger) -> None:
    ledger.intake.record_page(
        "ehr",
        [],
        [
            SeenVersion("Appointment", "bad", "1", NOW, "not valid FHIR R4: status"),
            SeenVersion("Appointment", "old", "1", NOW - timedelta(days=1)),
        ],
        None,
    )
    assert ledger.intake.prune_seen("ehr", NOW - timedelta(hours=1)) == 1
    [(source, seen)] = ledger.reports.problems(10)
    assert (source, seen.resource_id, seen.problem) == ("ehr", "bad", "not valid FHIR R4: status")


def test_only_one_process_polls_a_source_at_a_time(ledger: SqlLedger) -> None:
    first = ledger.intake.try_lock_source("ehr")
    assert first is not False
    second = ledger.intake.try_lock_source("ehr")
    other = ledger.intake.try_lock_source("other")
    if ledger.dialect == "postgresql":
        assert second is False and other is not False
    else:  # SQLite: one process per ledger, guarded by the lock file
        assert second is True
    ledger.intake.unlock_source(first)
    ledger.intake.unlock_source(other)
    again = ledger.intake.try_lock_source("ehr")
    assert again is not False
    ledger.intake.unlock_source(again)


def test_a_withdrawn_never_attempted_notification_is_rearmed(ledger: SqlLedger) -> None:
    from connector.ledger import Withdrawal

    ledger.intake.add([planned("a")])
    ledger.intake.record_page("ehr", [], [], None, withdrawals=[Withdrawal("a", ("p1",), "moved")])
    assert ledger.reports.existing(["a"])["a"].state is State.CANCELLED
    assert ledger.intake.add([planned("a")]) == ["a"]
    assert ledger.reports.existing(["a"])["a"].state is State.PENDING


def test_remembered_state_never_goes_back_to_an_older_version(ledger: SqlLedger) -> None:
    from connector.lifecycle import Snapshot

    newer = Snapshot("booked", NOW, NOW, "3", ("p1",), NOW)
    older = Snapshot("booked", NOW - timedelta(days=1), NOW, "2", ("p1",), NOW - timedelta(minutes=1))
    ledger.intake.record_page("ehr", [], [], None, {"a1": newer})
    ledger.intake.record_page("ehr", [], [], None, {"a1": older})
    assert ledger.intake.snapshots("ehr", ["a1"])["a1"].version == "3"
