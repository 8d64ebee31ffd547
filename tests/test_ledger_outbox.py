"""The outbox role of the ledger (claims, sending, outcomes, leases), run against SQLite and the real
PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from connector.ledger import SendResult
from connector.ledger.sql import SqlLedger
from connector.models import State
from tests.factories import NOW, planned


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


def test_what_a_replica_planned_is_its_own_to_claim_for_the_grace_period(ledger: SqlLedger) -> None:
    ledger.intake.affinity = ("poller", timedelta(seconds=30))
    ledger.intake.add([planned("a"), planned("b")])
    ledger.intake.affinity = None
    ledger.intake.add([planned("c")])  # planned by a process without affinity: anyone's at once
    wall = datetime.now(UTC)
    lease = wall + timedelta(minutes=5)
    assert [r.key for r in ledger.outbox.claim_due(NOW, 10, "other", lease, wall)] == ["c"]
    assert ledger.outbox.start_sending([1, 2], "other", lease) == set()  # a planned lease is not a claim
    [a] = ledger.outbox.claim_due(NOW, 1, "poller", lease, wall)
    assert a.key == "a"
    assert ledger.outbox.claim_due(NOW, 10, "poller", lease, wall)[0].key == "b"
    assert ledger.outbox.claim_due(NOW, 10, "poller", lease, wall) == []  # its claims are not claimed twice
    ledger.intake.affinity = ("poller", timedelta(seconds=30))
    ledger.intake.add([planned("d")])
    assert ledger.outbox.claim_due(NOW, 10, "other", lease, wall + timedelta(seconds=20)) == []
    [late] = ledger.outbox.claim_due(NOW, 10, "other", lease, wall + timedelta(seconds=40))  # grace over
    assert late.key == "d"


def test_release_gives_back_what_was_planned_with_affinity(ledger: SqlLedger) -> None:
    ledger.intake.affinity = ("poller", timedelta(minutes=1))
    ledger.intake.add([planned("a")])
    wall = datetime.now(UTC)
    assert ledger.outbox.release("poller") == 1  # a stopping daemon gives them to the others
    assert len(ledger.outbox.claim_due(NOW, 10, "other", wall + timedelta(minutes=5), wall)) == 1


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
