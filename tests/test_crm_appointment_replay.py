"""`connector replay --source <crm>` and CRM appointments: the stored events go through the lifecycle again (in
the order received, from first sight), so a replay plans what the events call for now, never re-arms what a
later event withdrew, and the ledger suppresses everything it already holds; on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select

from connector.commands.run import replay_crm
from connector.config import load_config
from connector.daemon import run_once
from connector.delivery.paubox import PauboxRestMailer
from connector.ledger.engine import INBOX
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import create_app as paubox_app
from tests import test_crm_appointments as base
from tests.test_crm_appointments import MEETINGS, REMINDERS, World, at, service_appointment

# the fixtures of the CRM appointment tests: a ledger on SQLite and on PostgreSQL, the receiver and runtime
ledger_url = base.ledger_url
world = base.world

RESCHEDULE = "04l000000000002AAA"


def received(world: World, event_id: str) -> datetime:
    with world.runtime.ledger.engine.connect() as conn:
        found: datetime = conn.execute(select(INBOX.c.received_at).where(INBOX.c.event_id == event_id)).scalar_one()
    return found


def planned(items: list[Any]) -> list[tuple[str, str]]:
    """(mapping, start it counts from) of each replayed notification."""
    return sorted((i.notification.mapping, at(i.notification.appointment_start)) for i in items)


async def booked_then_moved(world: World) -> tuple[datetime, datetime]:
    """A Salesforce booking, then its move a day later, then a stale redelivery of the booking."""
    start = (world.clock.now + timedelta(days=5)).replace(hour=15, minute=0, second=0)
    t0 = world.clock.now - timedelta(minutes=30)
    await world.salesforce(service_appointment("04l000000000001AAA", start, modified=t0))
    world.clock.now += timedelta(minutes=5)
    later = start + timedelta(days=1)
    await world.salesforce(service_appointment(RESCHEDULE, later, modified=t0 + timedelta(minutes=10)))
    world.clock.now += timedelta(minutes=5)
    await world.salesforce(service_appointment("04l000000000003AAA", start, modified=t0))
    return start, later


async def test_a_crm_replay_plans_appointment_events_again_and_adds_nothing_twice(world: World) -> None:
    start, later = await booked_then_moved(world)
    before = world.outline("salesforce")
    assert len(world.paubox.messages) == 2  # the confirmation and the move

    # dry run over everything: what the events call for now is all in the ledger already; what the move
    # withdrew (had it been pending: the confirmation and the reminders for the old start) is not planned
    # again, and the stale redelivery plans nothing
    dry = await replay_crm(world.runtime, "salesforce", None, None, dry=True)
    assert planned(dry.items) == [
        ("crm-appointment-reminder-2h", at(later)),
        ("crm-appointment-reminder-48h", at(later)),
        ("crm-appointment-rescheduled", at(later)),
    ]
    assert all(i.existing is not None and not i.inserted for i in dry.items) and dry.quarantined == []
    assert world.outline("salesforce") == before

    # a real replay: nothing inserted, nothing re-armed, nothing sent
    real = await replay_crm(world.runtime, "salesforce", None, None, dry=False)
    assert not any(i.inserted for i in real.items) and len(real.items) == 3
    assert world.outline("salesforce") == before and len(world.paubox.messages) == 2

    # a window holding only the move: its share, decided after the booking received before it (a move,
    # not a first booking at the new time)
    moved = await replay_crm(world.runtime, "salesforce", received(world, RESCHEDULE), None, dry=True)
    assert [m for m, _ in planned(moved.items)] == [*REMINDERS, "crm-appointment-rescheduled"]

    # a window holding only the booking: nothing, all it planned for the old start the later move withdrew
    booking = await replay_crm(world.runtime, "salesforce", None, received(world, "04l000000000001AAA"), dry=True)
    assert booking.items == [] and booking.quarantined == []
    assert start != later


async def test_a_crm_replay_after_a_new_mapping_arms_it_for_the_current_start(world: World, tmp_path: Any) -> None:
    _, later = await booked_then_moved(world)
    before = world.outline("salesforce")
    mappings = tmp_path / "mappings"
    text = (mappings / "crm-appointment-reminder-48h.yaml").read_text()
    (mappings / "crm-appointment-reminder-24h.yaml").write_text(
        text.replace("name: crm-appointment-reminder-48h", "name: crm-appointment-reminder-24h").replace(
            "at: start - 48h", "at: start - 24h"
        )
    )
    world.runtime = await reopen(world, tmp_path)
    try:
        await replay_and_send(world, before, later)
    finally:
        await world.runtime.aclose()


async def replay_and_send(world: World, before: list[tuple[str, str, str]], later: datetime) -> None:
    replayed = await replay_crm(world.runtime, "salesforce", None, None, dry=False)
    assert [(i.notification.mapping, i.inserted) for i in replayed.items if i.inserted] == [
        ("crm-appointment-reminder-24h", True)
    ]
    assert sorted(world.outline("salesforce")) == sorted([*before, ("crm-appointment-reminder-24h", "pending", "")])
    [armed] = [r for r in world.rows("salesforce") if r.mapping == "crm-appointment-reminder-24h"]
    assert (armed.appointment_start, armed.due_at) == (later, later - timedelta(hours=24))
    assert len(world.paubox.messages) == 2  # not due yet

    # once more: the ledger holds it, nothing new
    again = await replay_crm(world.runtime, "salesforce", None, None, dry=False)
    assert not any(i.inserted for i in again.items)
    world.clock.now = later - timedelta(hours=24)
    await run_once(world.runtime)
    sent = {r.mapping for r in world.rows("salesforce") if r.state == "sent"}
    assert {"crm-appointment-reminder-24h", "crm-appointment-reminder-48h"} <= sent  # both due by now
    assert len(world.paubox.messages) == 4


async def reopen(world: World, tmp_path: Any) -> Runtime:
    """The same ledger and sandboxes, with the mappings read again (as a restarted `connector replay` would)."""
    await world.runtime.aclose()
    config = load_config(tmp_path / "config.yaml")
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(world.paubox)))
    return Runtime.open(
        config, world.clock, mailer=mailer, source_transport=httpx.ASGITransport(app=fhir_app(FhirState()))
    )


async def test_a_hubspot_replay_reads_the_meetings_again_and_changes_nothing(world: World) -> None:
    """A cancelled meeting, a deleted one and a moved one. The events of a meeting all read it as it is now,
    so a replay meets the moved one booked at its new start: its patient, already told, is not confirmed
    again (under the new start's key). The replay plans what the ledger holds, nothing for the meeting
    HubSpot no longer has, and re-arms no withdrawn reminder."""
    start = (world.clock.now + timedelta(days=4)).replace(hour=9, minute=30, second=0)
    meeting = {
        "hs_meeting_start_time": start.isoformat(),
        "hs_meeting_end_time": (start + timedelta(minutes=30)).isoformat(),
        "hs_meeting_outcome": "SCHEDULED",
        "patient_email": "ottoline.hs@example.org",
        "patient_language": "en",
    }

    def event(number: int, meeting_id: int, kind: str = "object.creation") -> dict[str, Any]:
        occurred = int((world.clock.now.timestamp() + number) * 1000)
        return {
            "eventId": number,
            "subscriptionType": kind,
            "objectId": meeting_id,
            "objectTypeId": "0-47",
            "occurredAt": occurred,
        }

    MEETINGS["901"], MEETINGS["902"], MEETINGS["903"] = dict(meeting), dict(meeting), dict(meeting)
    await world.hubspot([event(1, 901), event(2, 902), event(3, 903)])
    MEETINGS["901"]["hs_meeting_outcome"] = "CANCELED"
    del MEETINGS["902"]
    later = start + timedelta(days=1)
    MEETINGS["903"]["hs_meeting_start_time"] = later.isoformat()
    changes = [event(4, 901, "object.propertyChange"), event(5, 902, "object.deletion")]
    await world.hubspot([*changes, event(6, 903, "object.propertyChange")])
    before = world.outline("hubspot")
    assert len(world.paubox.messages) == 5  # three confirmations, a cancellation, a move
    assert [r for r in before if r[1] == "pending"] == [
        ("crm-appointment-reminder-2h", "pending", f"2h before {at(later)}"),
        ("crm-appointment-reminder-48h", "pending", f"48h before {at(later)}"),
    ]

    dry = await replay_crm(world.runtime, "hubspot", None, None, dry=True)
    assert sorted((i.notification.mapping, i.notification.resource_id) for i in dry.items) == [
        ("crm-appointment-cancelled", "901"),
        ("crm-appointment-reminder-2h", "903"),
        ("crm-appointment-reminder-48h", "903"),
    ]
    real = await replay_crm(world.runtime, "hubspot", None, None, dry=False)
    assert not any(i.inserted for i in real.items) and real.quarantined == []
    assert world.outline("hubspot") == before and len(world.paubox.messages) == 5


async def test_the_replay_command_lists_crm_appointment_notifications(world: World, tmp_path: Any) -> None:
    """`connector replay --source <crm> --dry-run` beside the running daemon (a dry run needs no lock)."""
    await booked_then_moved(world)
    command = ["replay", "--source", "salesforce", "--since", "2000-01-01T00:00:00Z", "--dry-run"]
    result = subprocess.run(
        [sys.executable, "-m", "connector", *command, "--config", str(tmp_path / "config.yaml")],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "400"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    said = " ".join(result.stdout.split())
    assert all(name in said for name in [*REMINDERS, "crm-appointment-rescheduled"])
    assert said.endswith("3 suppressed") and "CrmAppointment/08p5g00000SeRvAAAA" in said
