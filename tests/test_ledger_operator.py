"""The operator role of the ledger (selections by id, key or filter; settle and requeue many at once, each
change recorded), run against SQLite and the real PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from connector.ledger.operator import Selection
from connector.ledger.sql import SqlLedger
from connector.models import State
from tests.factories import NOW, planned


def _fill(ledger: SqlLedger) -> dict[str, int]:
    """Six notifications: two mappings, two sources, four states. Returns key → id."""
    rows = [
        planned("d1", state=State.IN_DOUBT),
        planned("d2", state=State.IN_DOUBT),
        replace(planned("d3", state=State.IN_DOUBT), mapping="reminder"),
        planned("f1", state=State.FAILED),
        replace(planned("f2", state=State.FAILED), source="crm"),
        planned("s1", state=State.SENT),
    ]
    ledger.intake.add(rows)
    return {k: r.id for k, r in ledger.reports.existing([r.key for r in rows]).items()}


def test_an_empty_selection_selects_nothing(ledger: SqlLedger) -> None:
    _fill(ledger)
    assert Selection().empty
    assert ledger.operator.count(Selection()) == {}
    assert ledger.operator.settle(Selection(), State.CANCELLED, [State.IN_DOUBT], "op", "x").ids == ()


def test_selection_by_id_key_and_filters(ledger: SqlLedger) -> None:
    ids = _fill(ledger)
    op = ledger.operator
    assert op.count(Selection(ids=(ids["d1"], ids["f1"]))) == {State.IN_DOUBT: 1, State.FAILED: 1}
    assert op.count(Selection(keys=("d2", "s1"))) == {State.IN_DOUBT: 1, State.SENT: 1}
    assert op.count(Selection(ids=(ids["d1"],), keys=("d2",))) == {State.IN_DOUBT: 2}
    assert op.count(Selection(states=(State.IN_DOUBT,), mappings=("m",))) == {State.IN_DOUBT: 2}
    assert op.count(Selection(states=(State.FAILED,), sources=("crm",))) == {State.FAILED: 1}
    assert op.count(Selection(mappings=("m",)), states=[State.FAILED]) == {State.FAILED: 2}
    # the states an action applies to narrow the selection's own states, never widen them
    assert op.count(Selection(states=(State.SENT,)), states=[State.IN_DOUBT]) == {}
    later = datetime.now(UTC) + timedelta(hours=1)
    assert op.count(Selection(states=(State.IN_DOUBT,), since=later)) == {}
    assert op.count(Selection(states=(State.IN_DOUBT,), until=later)) == {State.IN_DOUBT: 3}


def test_pages_follow_the_id_without_offsets(ledger: SqlLedger) -> None:
    ids = _fill(ledger)
    selection = Selection(states=(State.IN_DOUBT, State.FAILED))
    first = ledger.operator.page(selection, None, 3)
    second = ledger.operator.page(selection, first[-1].id, 3)
    assert [r.key for r in first] == ["d1", "d2", "d3"]
    assert [r.key for r in second] == ["f1", "f2"]
    assert ledger.operator.page(selection, second[-1].id, 3) == []
    assert [r.id for r in first + second] == sorted(ids[k] for k in ("d1", "d2", "d3", "f1", "f2"))


def test_settle_changes_only_what_the_action_applies_to_and_records_each(ledger: SqlLedger) -> None:
    ids = _fill(ledger)
    changed = ledger.operator.settle(
        Selection(mappings=("m",)), State.CANCELLED, [State.IN_DOUBT], "alice", "cancelled by an operator"
    )
    assert changed.ids == (ids["d1"], ids["d2"]) and changed.by_state == {State.IN_DOUBT: 2}
    states = {k: r.state for k, r in ledger.reports.existing(list(ids)).items()}
    assert states == {
        "d1": State.CANCELLED,
        "d2": State.CANCELLED,
        "d3": State.IN_DOUBT,  # another mapping
        "f1": State.FAILED,  # not in doubt
        "f2": State.FAILED,
        "s1": State.SENT,
    }
    [action] = ledger.operator.history(ids["d1"])
    assert (action.action, action.from_state, action.to_state, action.actor, action.role) == (
        "resolve-cancel",
        State.IN_DOUBT,
        State.CANCELLED,
        "alice",
        "cli",
    )
    assert ledger.operator.history(ids["d3"]) == []
    again = ledger.operator.settle(Selection(mappings=("m",)), State.CANCELLED, [State.IN_DOUBT], "alice", "again")
    assert again.ids == ()  # nothing left in doubt there: nothing recorded twice
    assert len(ledger.operator.history(ids["d1"])) == 1


def test_settle_as_sent_sets_the_sent_time(ledger: SqlLedger) -> None:
    ids = _fill(ledger)
    ledger.operator.settle(Selection(keys=("d3",)), State.SENT, [State.IN_DOUBT], "bob", "sent, checked")
    record = ledger.reports.existing(["d3"])["d3"]
    assert record.state is State.SENT and record.reason == "sent, checked"
    with pytest.raises(ValueError):
        ledger.operator.settle(Selection(ids=(ids["d1"],)), State.PENDING, [State.IN_DOUBT], "bob", "no")


def test_requeue_sends_failed_ones_again_under_the_same_key(ledger: SqlLedger) -> None:
    ids = _fill(ledger)
    ledger.after_send.record_delivery("f2", None, "delivered", 3, NOW)  # Paubox says it arrived: left alone
    changed = ledger.operator.requeue(Selection(states=(State.FAILED,)), NOW, [State.FAILED], "carol", "retry")
    assert changed.ids == (ids["f1"],) and changed.to_state is State.PENDING
    record = ledger.reports.existing(["f1"])["f1"]
    assert (record.state, record.attempts, record.resends, record.due_at) == (State.PENDING, 0, 1, NOW)
    assert ledger.reports.existing(["f2"])["f2"].state is State.FAILED
    [action] = ledger.operator.history(ids["f1"])
    assert (action.action, action.from_state, action.to_state) == ("retry", State.FAILED, State.PENDING)


def test_many_at_once_in_one_transaction(ledger: SqlLedger) -> None:
    keys = [f"k{i:04d}" for i in range(1200)]  # more than one IN (...) chunk
    ledger.intake.add([planned(k, state=State.FAILED) for k in keys])
    changed = ledger.operator.requeue(Selection(states=(State.FAILED,)), NOW, [State.FAILED], "ops", "retry")
    assert len(changed.ids) == 1200 and changed.by_state == {State.FAILED: 1200}
    assert ledger.reports.counts()[State.PENDING] == 1200
