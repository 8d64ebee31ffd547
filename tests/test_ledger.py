"""The ledger contract, run against SQLite and the real PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from connector.ledger import SeenVersion, SendResult
from connector.ledger.sql import SqlLedger
from connector.models import PlannedNotification, State

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def planned(key: str, due: datetime = NOW, state: State = State.PENDING) -> PlannedNotification:
    return PlannedNotification(
        key=key,
        source="ehr",
        mapping="m",
        event="booked",
        resource_type="Appointment",
        resource_id=key,
        resource_version="1",
        patient_id="p1",
        due_at=due,
        state=state,
    )


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


def test_claim_send_finish(ledger: SqlLedger) -> None:
    ledger.intake.add([planned("a"), planned("later", due=NOW + timedelta(hours=1))])
    wall = datetime.now(UTC)
    [claimed] = ledger.outbox.claim_due(NOW, 10, "w1", wall + timedelta(minutes=5), wall)
    assert claimed.key == "a"
    assert ledger.outbox.claim_due(NOW, 10, "w2", wall + timedelta(minutes=5), wall) == []  # leased
    assert ledger.outbox.start_sending(claimed.id, "w2", wall + timedelta(minutes=5)) == set()  # not the lease holder
    assert ledger.outbox.start_sending(claimed.id, "w1", wall + timedelta(minutes=5)) == {claimed.id}
    assert ledger.reports.counts()[State.SENDING] == 1
    ledger.outbox.finish([SendResult(claimed.id, State.SENT, tracking_id="track-1", when=NOW)])
    [record] = ledger.reports.existing(["a"]).values()
    assert (record.state, record.tracking_id, record.attempts) == (State.SENT, "track-1", 1)


def test_expired_lease_is_claimable_again(ledger: SqlLedger) -> None:
    ledger.intake.add([planned("a")])
    wall = datetime.now(UTC)
    ledger.outbox.claim_due(NOW, 10, "dead", wall - timedelta(seconds=1), wall - timedelta(minutes=5))
    [again] = ledger.outbox.claim_due(NOW, 10, "alive", wall + timedelta(minutes=5), wall)
    assert again.key == "a"


def test_interrupted_sends_become_in_doubt_never_pending(ledger: SqlLedger) -> None:
    ledger.intake.add([planned("a"), planned("b")])
    wall = datetime.now(UTC)
    for record in ledger.outbox.claim_due(NOW, 10, "w1", wall + timedelta(minutes=5), wall):
        ledger.outbox.start_sending(record.id, "w1", wall + timedelta(minutes=5))
    assert ledger.outbox.mark_interrupted(wall, everything=False) == 0  # leases still live
    assert ledger.outbox.mark_interrupted(wall + timedelta(minutes=6), everything=False) == 2
    assert ledger.reports.counts()[State.IN_DOUBT] == 2
    assert ledger.outbox.claim_due(NOW, 10, "w2", wall + timedelta(minutes=5), wall) == []


def test_retry_later_and_settle(ledger: SqlLedger) -> None:
    ledger.intake.add([planned("a"), planned("b")])
    wall = datetime.now(UTC)
    a, b = ledger.outbox.claim_due(NOW, 10, "w1", wall + timedelta(minutes=5), wall)
    ledger.outbox.start_sending(a.id, "w1", wall + timedelta(minutes=5))
    ledger.outbox.finish([SendResult(a.id, State.PENDING, "HTTP 429", due_at=NOW + timedelta(minutes=1))])
    ledger.outbox.settle(b.id, "w1", State.SKIPPED, "no address")
    records = ledger.reports.existing(["a", "b"])
    assert (records["a"].state, records["a"].attempts, records["a"].due_at) == (
        State.PENDING,
        1,
        NOW + timedelta(minutes=1),
    )
    assert (records["b"].state, records["b"].reason) == (State.SKIPPED, "no address")
    assert ledger.outbox.claim_due(NOW, 10, "w1", wall + timedelta(minutes=5), wall) == []
    assert [r.key for r in ledger.outbox.claim_due(NOW + timedelta(minutes=1), 10, "w1", wall, wall)] == ["a"]


def test_release_gives_back_leases(ledger: SqlLedger) -> None:
    ledger.intake.add([planned("a")])
    wall = datetime.now(UTC)
    ledger.outbox.claim_due(NOW, 10, "w1", wall + timedelta(minutes=5), wall)
    assert ledger.outbox.release("w1") == 1
    assert len(ledger.outbox.claim_due(NOW, 10, "w2", wall + timedelta(minutes=5), wall)) == 1


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


def test_an_operator_cancelled_doubt_is_never_rearmed(ledger: SqlLedger) -> None:
    ledger.intake.add([planned("a")])
    wall = datetime.now(UTC)
    [record] = ledger.outbox.claim_due(NOW, 10, "w1", wall + timedelta(minutes=5), wall)
    ledger.outbox.start_sending(record.id, "w1", wall + timedelta(minutes=5))
    ledger.outbox.finish([SendResult(record.id, State.IN_DOUBT, "timeout")])
    assert ledger.after_send.resolve("a", State.CANCELLED, "operator", [State.IN_DOUBT])
    assert ledger.intake.add([planned("a")]) == []  # planned again (a replay): stays cancelled
    assert ledger.reports.existing(["a"])["a"].state is State.CANCELLED


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


def test_a_webhook_confirms_a_resent_copy_before_it_goes(ledger: SqlLedger) -> None:
    ledger.intake.add([planned("a")])
    wall = datetime.now(UTC)
    [record] = ledger.outbox.claim_due(NOW, 10, "w1", wall + timedelta(minutes=5), wall)
    ledger.outbox.start_sending(record.id, "w1", wall + timedelta(minutes=5))
    ledger.outbox.finish([SendResult(record.id, State.IN_DOUBT, "timeout")])
    assert ledger.after_send.resend(record.id, NOW, "policy", [State.IN_DOUBT], first_only=True)
    assert ledger.reports.existing(["a"])["a"].first_attempt_at is None  # the age limit starts again
    assert ledger.after_send.confirm("a", "track-1", "confirmed by a Paubox webhook")  # the first copy arrived
    assert ledger.reports.existing(["a"])["a"].state is State.SENT
    assert not ledger.after_send.resend(record.id, NOW, "policy", [State.SENT, State.IN_DOUBT], first_only=True)


def test_one_finish_records_every_kind_of_ending(ledger: SqlLedger) -> None:
    keys = ["sent", "failed", "doubt", "confirmed", "again", "paused", "late"]
    ledger.intake.add([planned(k) for k in keys])
    wall = datetime.now(UTC)
    claimed = {r.key: r for r in ledger.outbox.claim_due(NOW, 10, "w1", wall + timedelta(minutes=5), wall)}
    assert ledger.outbox.start_sending([r.id for r in claimed.values()], "w1", wall + timedelta(minutes=5)) == {
        r.id for r in claimed.values()
    }
    ledger.after_send.record_delivery("confirmed", None, "delivered", 3, NOW)  # a webhook came before the answer
    ledger.outbox.mark_interrupted(wall + timedelta(minutes=6), everything=False)  # all in_doubt: leases ran out
    ids = {k: r.id for k, r in claimed.items()}
    ledger.outbox.finish(
        [
            SendResult(ids["sent"], State.SENT, tracking_id="t-1", when=NOW),
            SendResult(ids["failed"], State.FAILED, "HTTP 400: bad address"),
            SendResult(ids["doubt"], State.IN_DOUBT, "read timeout"),
            SendResult(ids["confirmed"], State.IN_DOUBT, "read timeout"),
            SendResult(ids["late"], State.SENT, when=NOW),
        ]
    )
    records = ledger.reports.existing(keys)
    assert (records["sent"].state, records["sent"].tracking_id) == (State.SENT, "t-1")
    assert (records["failed"].state, records["failed"].reason) == (State.FAILED, "HTTP 400: bad address")
    assert (records["doubt"].state, records["doubt"].reason) == (State.IN_DOUBT, "read timeout")
    assert (records["confirmed"].state, records["confirmed"].reason) == (State.SENT, "confirmed by a Paubox webhook")
    assert records["late"].state is State.SENT
    # A retry only applies to a notification still `sending`: in_doubt ones stay for a person.
    ledger.outbox.finish([SendResult(ids["again"], State.PENDING, "HTTP 500", due_at=NOW)])
    assert ledger.reports.existing(["again"])["again"].state is State.IN_DOUBT


def test_a_retry_may_give_the_attempt_back(ledger: SqlLedger) -> None:
    ledger.intake.add([planned("a"), planned("b")])
    wall = datetime.now(UTC)
    a, b = ledger.outbox.claim_due(NOW, 10, "w1", wall + timedelta(minutes=5), wall)
    ledger.outbox.start_sending([a.id, b.id], "w1", wall + timedelta(minutes=5))
    ledger.outbox.finish(
        [
            SendResult(a.id, State.PENDING, "HTTP 429", due_at=NOW, count_attempt=False),
            SendResult(b.id, State.PENDING, "HTTP 503", due_at=NOW + timedelta(seconds=30)),
        ]
    )
    records = ledger.reports.existing(["a", "b"])
    assert (records["a"].state, records["a"].attempts, records["a"].reason) == (State.PENDING, 0, "HTTP 429")
    assert (records["b"].attempts, records["b"].due_at) == (1, NOW + timedelta(seconds=30))
    assert ledger.optouts.opted_out_many([[("email", "nobody")], []]) == [None, None]
