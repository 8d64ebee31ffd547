"""The journal (what happened to each notification and appointment, written in the transaction that made it
happen) and the one audit trail the CLI and the console share: on SQLite and PostgreSQL, end to end through
the daemon, the Paubox sandbox and its webhooks, and the migration that joined the two old audit tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command

from connector.daemon import aftercare
from connector.ledger import SeenVersion, SendResult, Withdrawal, migrate
from connector.ledger.engine import make_engine
from connector.ledger.operator import Selection
from connector.ledger.sql import SqlLedger
from connector.lifecycle import Snapshot
from connector.models import State
from connector.web.console import facts
from tests.factories import NOW, planned
from tests.test_delivery import T0, Rig, appointment, hooked, log_output, wait_for_webhooks  # noqa: F401

LIFE = [
    ("planned", "pending"),
    ("claimed", "pending"),
    ("sending", "sending"),
    ("outcome", "sent"),
    ("delivery", "delivered"),
]


async def test_a_notifications_whole_life_appears_in_order_and_the_appointments_transitions(
    hooked: Rig,  # noqa: F811 (the fixture of tests/test_delivery.py)
) -> None:
    await hooked.cycle()
    await wait_for_webhooks(hooked)
    ledger = hooked.runtime.ledger
    record = hooked.record("p1")
    events = ledger.journal.of_notification(record.id)  # type: ignore[attr-defined]
    assert [(e.event, e.state) for e in events] == LIFE
    assert [e.at for e in events] == sorted(e.at for e in events)
    tracking = hooked.paubox.messages[0]["sourceTrackingId"]
    assert tracking in (events[3].detail or "") and events[4].detail == "by webhook"
    assert "robin" not in repr(events).lower() and record.key not in repr(events)  # type: ignore[attr-defined]
    detail = ledger.console.detail(record.id)  # type: ignore[attr-defined]
    assert detail is not None
    shown = [s.what for s in facts.timeline(detail).steps if s.what != "due"]
    assert shown == [f"{event}: {state}" for event, state in LIFE]

    hooked.fhir.put(appointment("a0", "p1", T0 + timedelta(days=4)))  # moved a day
    await hooked.cycle(timedelta(minutes=5))
    hooked.fhir.put(appointment("a0", "p1", T0 + timedelta(days=4), status="cancelled"))
    await hooked.cycle(timedelta(minutes=5))
    seen = ledger.journal.of_appointment("a0")
    assert [e.state for e in seen] == ["booked", "booked", "cancelled"]
    assert seen[0].detail.endswith("first seen") and seen[1].detail.endswith("same status; start moved")  # type: ignore[union-attr]
    assert "booked → cancelled" in (seen[2].detail or "") and seen[2].source == "ehr"
    story = facts.appointment(ledger, "a0")
    assert [e.id for e in story.transitions] == [e.id for e in seen]
    hooked.clock.now = datetime.now(UTC) + timedelta(days=89)  # the daemon keeps `ledger.journal_retention` (90d)
    await aftercare(hooked.runtime)
    assert len(ledger.journal.of_notification(record.id)) == len(LIFE)  # type: ignore[attr-defined]
    hooked.clock.now += timedelta(days=2)
    await aftercare(hooked.runtime)
    assert ledger.journal.of_notification(record.id) == [] and ledger.journal.of_appointment("a0") == []  # type: ignore[attr-defined]


def _snap(status: str, version: str, start: datetime, at: datetime) -> Snapshot:
    return Snapshot(status, start, start + timedelta(minutes=30), version, ("p1",), at)


def test_intake_journals_plans_withdrawals_and_transitions_in_its_transaction(ledger: SqlLedger) -> None:
    start = NOW + timedelta(days=2)
    reminder = planned("r1", due=NOW + timedelta(days=1))
    seen = [SeenVersion("Appointment", "r1", "1", NOW)]
    ledger.intake.record_page("ehr", [reminder], seen, NOW, {"r1": _snap("booked", "1", start, NOW)})
    later = NOW + timedelta(hours=1)
    ledger.intake.record_page("ehr", [], [], later, {"r1": _snap("booked", "1", start, NOW)})  # nothing new
    cancelled = _snap("cancelled", "2", start, later)
    withdrawal = Withdrawal("r1", ("p1",), "appointment cancelled")
    ledger.intake.record_page("ehr", [], [], later, {"r1": cancelled}, [withdrawal])
    ledger.intake.record_page("ehr", [], [], later, {"r1": None})  # deleted at the source
    nid = ledger.reports.existing(["r1"])["r1"].id
    events = ledger.journal.of_notification(nid)
    assert [(e.event, e.state, e.detail) for e in events] == [
        ("planned", "pending", "booked from Appointment version 1"),
        ("withdrawn", "cancelled", "appointment cancelled"),
    ]
    seen_events = ledger.journal.of_appointment("r1")
    assert [(e.state, e.detail) for e in seen_events] == [
        ("booked", "version 1: first seen"),
        ("cancelled", "version 2: booked → cancelled"),
        ("deleted", "deleted (was cancelled)"),
    ]
    assert ledger.journal.purge(datetime.now(UTC) + timedelta(seconds=1)) == 5
    assert ledger.journal.of_notification(nid) == [] and ledger.journal.of_appointment("r1") == []


def test_outbox_and_after_send_journal_doubt_resends_receipts_and_operators(ledger: SqlLedger) -> None:
    ledger.intake.add([planned("k1", due=NOW)])
    [claimed] = ledger.outbox.claim_due(NOW, 10, "worker-1", NOW + timedelta(minutes=5), NOW)
    assert ledger.outbox.start_sending([claimed.id], "worker-1", NOW + timedelta(minutes=5)) == {claimed.id}
    assert ledger.outbox.mark_interrupted(NOW + timedelta(hours=1), everything=True) == 1  # a crash: in doubt
    ledger.after_send.mark_alerted([claimed.id])
    ledger.operator.requeue(Selection(ids=(claimed.id,)), NOW, [State.IN_DOUBT], "cli:alice", "lost")
    assert ledger.after_send.confirm("k1", "track-1", "confirmed by a Paubox webhook")
    assert ledger.after_send.record_delivery("k1", None, "delivered", 3, NOW, "receipt")
    assert not ledger.after_send.record_delivery("k1", None, "delivered", 3, NOW)  # a repeat: no entry
    events = [(e.event, e.state) for e in ledger.journal.of_notification(claimed.id)]
    assert events == [
        ("planned", "pending"),
        ("claimed", "pending"),
        ("sending", "sending"),
        ("outcome", "in_doubt"),
        ("alerted", "in_doubt"),
        ("confirmed", "sent"),
        ("delivery", "delivered"),
    ]
    [action] = ledger.operator.history(claimed.id)  # operators' actions are in the audit trail, not the journal
    assert (action.action, action.role, action.from_state, action.to_state) == (
        "resolve-resend",
        "cli",
        State.IN_DOUBT,
        State.PENDING,
    )
    detail = ledger.console.detail(claimed.id)
    assert detail is not None
    whats = [s.what for s in facts.timeline(detail).steps]
    assert whats.index("outcome: in_doubt") < whats.index("resolve-resend: in_doubt → pending")
    assert whats.index("resolve-resend: in_doubt → pending") < whats.index("confirmed: sent")


def test_an_outcome_is_journalled_as_the_state_the_row_took_and_only_if_it_took_it(ledger: SqlLedger) -> None:
    """A webhook confirmed the send before the mailer's doubtful answer (the row becomes sent); an operator
    cancelled one whose late answer then came (the row stays cancelled): the journal tells what happened."""
    ledger.intake.add([planned("k2", due=NOW)])
    claimed = ledger.outbox.claim_due(NOW, 10, "worker-1", NOW + timedelta(minutes=5), NOW)
    ids = {c.key: c.id for c in claimed}
    ledger.outbox.start_sending(list(ids.values()), "worker-1", NOW + timedelta(minutes=5))
    ledger.outbox.mark_interrupted(NOW + timedelta(hours=1), everything=True)  # its lease ran out: in doubt
    ledger.operator.settle(Selection(ids=(ids["k2"],)), State.CANCELLED, [State.IN_DOUBT], "cli:alice", "dup")
    ledger.outbox.finish([SendResult(ids["k2"], State.SENT, tracking_id="t-2", when=NOW)])
    assert ledger.console.detail(ids["k2"]).record.state is State.CANCELLED  # type: ignore[union-attr]
    outcomes = [e.state for e in ledger.journal.of_notification(ids["k2"]) if e.event == "outcome"]
    assert outcomes == ["in_doubt"]  # the late "sent" changed nothing, so it is not told

    ledger.intake.add([planned("k3", due=NOW)])
    [third] = ledger.outbox.claim_due(NOW, 10, "worker-1", NOW + timedelta(minutes=5), NOW)
    ledger.outbox.start_sending([third.id], "worker-1", NOW + timedelta(minutes=5))
    assert ledger.after_send.record_delivery("k3", None, "delivered", 3, NOW)
    ledger.outbox.finish([SendResult(third.id, State.IN_DOUBT, reason="timed out")])
    assert ledger.console.detail(third.id).record.state is State.SENT  # type: ignore[union-attr]
    [outcome] = [e for e in ledger.journal.of_notification(third.id) if e.event == "outcome"]
    assert (outcome.state, outcome.detail) == ("sent", "confirmed by a Paubox webhook")


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_upgrading_moves_both_old_audit_tables_into_one(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    migrate.upgrade(engine, "0013")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO operator_action (notification_id, action, from_state, to_state, actor, reason, at) VALUES "
            "(7, 'settle', 'in_doubt', 'sent', 'cli:alice', 'resolved by an operator: it was sent', "
            "'2026-11-30 10:00:00'), (8, 'requeue', 'failed', 'pending', 'cli:alice', 'retry ordered', "
            "'2026-11-30 12:00:00')"
        )
        conn.exec_driver_sql(
            "INSERT INTO console_audit (at, actor, role, action, notification_id, scope, count, reason) VALUES "
            "('2026-11-30 11:00:00', 'olivia', 'operator', 'preview', 7, NULL, 0, 'preview shown')"
        )
    migrate.upgrade(engine)
    ledger = SqlLedger(engine)
    trail = ledger.console.audit_log(None, 10)[::-1]  # oldest first
    assert [(e.actor, e.role, e.action, e.notification_id) for e in trail] == [
        ("cli:alice", "cli", "resolve-sent", 7),
        ("olivia", "operator", "preview", 7),
        ("cli:alice", "cli", "retry", 8),
    ]
    assert trail[0].at == datetime(2026, 11, 30, 10, tzinfo=UTC) and trail[2].from_state is State.FAILED
    assert [e.action for e in ledger.operator.history(7)] == ["resolve-sent", "preview"]
    config = migrate._alembic()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0013")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM operator_action").scalar() == 2
        assert conn.exec_driver_sql("SELECT count(*) FROM console_audit").scalar() == 1
    engine.dispose()


def test_an_unsubscribe_and_the_daily_cap_are_journalled_with_their_reasons(ledger: SqlLedger) -> None:
    ledger.intake.add([planned("u1", due=NOW + timedelta(days=1)), planned("c1", due=NOW)])
    ids = {k: r.id for k, r in ledger.reports.existing(["u1", "c1"]).items()}
    [claimed] = ledger.outbox.claim_due(NOW, 10, "worker-1", NOW + timedelta(minutes=5), NOW)  # c1, due now
    assert ledger.links.withdraw("ehr", "p1", ["m"], "the patient unsubscribed from reminders") == 1  # u1 only
    assert ledger.caps.defer(claimed.id, "worker-1", NOW + timedelta(days=1), "daily cap of 2 emails reached")
    withdrawn = ledger.journal.of_notification(ids["u1"])[-1]
    assert (withdrawn.event, withdrawn.state, withdrawn.detail) == (
        "withdrawn",
        "cancelled",
        "the patient unsubscribed from reminders",
    )
    assert [(e.event, e.detail) for e in ledger.journal.of_notification(ids["c1"])][1:] == [
        ("claimed", "leased to worker-1"),
        ("deferred", "daily cap of 2 emails reached"),
    ]
