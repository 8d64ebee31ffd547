"""The inbox and reports roles of the ledger, run against SQLite and the real PostgreSQL: sealed CRM events
stored once, planned with their processed mark in one transaction, purged after their retention; and the
counts and listings `connector status` reads."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from sqlalchemy import update

from connector.ledger import SeenVersion, Withdrawal
from connector.ledger.engine import N
from connector.ledger.sql import SqlLedger
from connector.lifecycle import Snapshot
from connector.models import State
from tests.factories import NOW, planned


def event(event_id: str, received: timedelta = timedelta(0)) -> dict[str, object]:
    return {
        "source": "crm",
        "event_id": event_id,
        "event_type": "contact.creation",
        "received_at": NOW + received,
        "key_id": "k1",
        "sealed": b"sealed bytes",
    }


def test_an_event_is_stored_once_and_planned_with_its_processed_mark(ledger: SqlLedger) -> None:
    inbox = ledger.inbox
    assert inbox.add([event("e1"), event("e2")]) == 2
    assert inbox.add([event("e1")]) == 0  # the sender retried: acknowledged, stored once
    first, second = inbox.pending(10)
    quarantined = SeenVersion("CrmEvent", str(second.id), "e2", None, "not a JSON object")
    assert inbox.commit([first.id, second.id], [planned("crm-1")], [("crm", quarantined)]) == ["crm-1"]
    assert inbox.pending(10) == []
    assert inbox.get(first.id).event_id == "e1"
    [(source, seen)] = ledger.reports.problems(10)
    assert (source, seen.resource_type, seen.problem) == ("crm", "CrmEvent", "not a JSON object")


def test_a_window_of_events_and_the_purge_of_processed_ones(ledger: SqlLedger) -> None:
    inbox = ledger.inbox
    inbox.add([event("old", -timedelta(days=40)), event("new")])
    assert [r.event_id for r in inbox.window("crm", NOW - timedelta(days=1), None)] == ["new"]
    assert [r.event_id for r in inbox.window("crm", None, NOW - timedelta(days=1))] == ["old"]
    assert inbox.purge(NOW - timedelta(days=30)) == 0  # not processed yet: kept whatever its age
    inbox.commit([r.id for r in inbox.pending(10)], [])
    assert inbox.purge(NOW - timedelta(days=30)) == 1
    assert [r.event_id for r in inbox.window("crm", None, None)] == ["new"]


def test_reports_count_every_state_and_list_the_newest_first(ledger: SqlLedger) -> None:
    ledger.intake.record_page("ehr", [planned("a"), planned("b", state=State.SKIPPED)], [], NOW)
    counts = ledger.reports.counts()
    assert set(counts) == set(State) and (counts[State.PENDING], counts[State.SKIPPED]) == (1, 1)
    assert [n.key for n in ledger.reports.notifications([State.SKIPPED], 10)] == ["b"]
    assert [n.key for n in ledger.reports.due(NOW, 10)] == ["a"]
    assert ledger.reports.cursors() == {"ehr": NOW}
    ledger.reports.add_rejections({("paubox", "unknown path token"): 2}, NOW)
    ledger.reports.add_rejections({("paubox", "unknown path token"): 1}, NOW + timedelta(minutes=1))
    assert ledger.reports.rejections() == [("paubox", "unknown path token", 3, NOW + timedelta(minutes=1))]


def test_the_event_an_upcoming_crm_appointment_was_last_told_by_outlives_the_retention(ledger: SqlLedger) -> None:
    """Its reminders are rendered from it; once the appointment started before the cut-off it goes too."""
    inbox = ledger.inbox
    inbox.add([event("booked", -timedelta(days=40)), event("other", -timedelta(days=40))])
    booked, other = inbox.pending(10)
    state = Snapshot("booked", NOW + timedelta(days=20), None, str(booked.id), ("contact",), NOW - timedelta(days=40))
    reminder = replace(planned("crm-r"), source="crm", resource_type="CrmAppointment", patient_id="contact")
    assert inbox.commit([booked.id, other.id], [reminder], [], [("crm", "crm-r", state)]) == ["crm-r"]
    assert inbox.purge(NOW - timedelta(days=30)) == 1
    assert [r.event_id for r in inbox.window("crm", None, None)] == ["booked"]
    # the appointment is cancelled by a later event: its pending reminder withdrawn in the same transaction
    inbox.add([event("cancelled")])
    [cancelled] = inbox.pending(10)
    moved = replace(state, status="cancelled", version=str(cancelled.id), last_updated=NOW)
    withdrawal = Withdrawal("crm-r", ("contact",), "withdrawn: the appointment became cancelled")
    inbox.commit([cancelled.id], [], [], [("crm", "crm-r", moved)], [("crm", withdrawal)])
    [record] = ledger.reports.notifications([State.CANCELLED], 10)
    assert record.key == "crm-r"
    assert inbox.purge(NOW - timedelta(days=30)) == 1  # no longer the state's event
    assert inbox.purge(NOW + timedelta(days=31)) == 1  # past the appointment too
    assert ledger.intake.snapshot("crm", "crm-r") == moved


def test_the_event_of_a_crm_appointment_with_no_mail_left_goes_with_the_retention(ledger: SqlLedger) -> None:
    """An appointment without a start, or one whose reminders all went: nothing is rendered from its event any
    more, so the patient data in it is not kept past the retention; mail in doubt (perhaps resent) keeps it."""
    inbox = ledger.inbox
    inbox.add([event("no-start", -timedelta(days=40)), event("all-sent", -timedelta(days=40))])
    first, second = inbox.pending(10)
    states = [
        ("crm", "a1", Snapshot("booked", None, None, str(first.id), ("contact",), NOW - timedelta(days=40))),
        ("crm", "a2", Snapshot("booked", NOW + timedelta(days=9), None, str(second.id), ("contact",), None)),
    ]
    mail = [
        replace(planned(f"crm-{a}"), source="crm", resource_type="CrmAppointment", resource_id=a, patient_id="contact")
        for a in ("a1", "a2")
    ]
    inbox.commit([first.id, second.id], mail, [], states)
    assert inbox.purge(NOW - timedelta(days=30)) == 0  # both still have mail to go

    def now_in(key: str, state: State) -> None:
        with ledger.engine.begin() as conn:
            conn.execute(update(N).where(N.c.key == key).values(state=state.value))

    now_in("crm-a1", State.IN_DOUBT)
    assert inbox.purge(NOW - timedelta(days=30)) == 0  # in doubt: it may be resent
    now_in("crm-a1", State.SENT)
    now_in("crm-a2", State.SENDING)
    assert inbox.purge(NOW - timedelta(days=30)) == 1  # a1's mail went; a2's is being sent
    now_in("crm-a2", State.SENT)
    assert inbox.purge(NOW - timedelta(days=30)) == 1 and inbox.window("crm", None, None) == []
