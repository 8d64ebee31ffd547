"""Checks around CRM appointments: a CrmAppointment mapping that can never fire (its CRM source declares no
`appointment:`) is refused by `connector validate` and at start, naming the file and line; the time events
are ordered by cannot be pushed into the future, and an event without a time does not erase it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from connector.commands.run import replay_crm
from connector.config import load_config
from connector.daemon import run_once
from connector.errors import ConfigError, LedgerError
from connector.intake.crm import INBOX_LOCK
from connector.ledger.engine import A
from connector.runtime import Runtime
from tests import test_crm_appointments as base
from tests.test_crm import SF_TOKEN, crm_env
from tests.test_crm_appointments import (
    DOWN,
    HUBSPOT,
    MEETINGS,
    READS,
    SALESFORCE,
    Clock,
    World,
    crm_config,
    service_appointment,
)

ledger_url = base.ledger_url
world = base.world


def without(config: Path, *declarations: str) -> None:
    text = config.read_text()
    for declaration in declarations:
        assert declaration in text
        text = text.replace(declaration, "")
    config.write_text(text)


def refused_by_validate(config: Path) -> str:
    """What `connector validate` says (one line) when it refuses `config` (exit 2), in a process of its own."""
    result = subprocess.run(
        [sys.executable, "-m", "connector", "validate", "--config", str(config)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        check=False,
    )
    assert result.returncode == 2, result.stdout
    return " ".join(result.stdout.split())


def test_validate_names_a_crm_appointment_mapping_whose_source_declares_no_appointment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crm_env(monkeypatch)
    monkeypatch.setenv("HUBSPOT_TOKEN", "pat-test-token")
    config = crm_config(tmp_path)
    without(config, SALESFORCE)
    booked = tmp_path / "mappings" / "crm-appointment-booked.yaml"
    booked.write_text(booked.read_text().replace("  event: booked\n", "  event: booked\n  sources: [salesforce]\n"))
    said = refused_by_validate(config)
    assert (
        f"{booked} line 9 (trigger.sources.0): source 'salesforce' has no `appointment:` declaration, so this "
        "CrmAppointment mapping never hears from it: declare one under crm.salesforce.appointment"
    ) in said
    # the mappings that hear from every source still have one that declares appointments (hubspot)
    assert said.count("has no `appointment:` declaration") == 1


def test_a_crm_appointment_mapping_with_no_declaring_source_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crm_env(monkeypatch)
    config = crm_config(tmp_path)
    without(config, SALESFORCE, HUBSPOT)
    with pytest.raises(ConfigError) as caught:
        Runtime.open(load_config(config), Clock())
    problems = [str(p) for p in caught.value.problems]
    assert len(problems) == 5  # the five example CrmAppointment mappings
    assert all(
        "line 7 (trigger.resource): no crm source in the config has an `appointment:` declaration" in p
        for p in problems
    ), problems


async def test_an_event_from_the_future_is_quarantined_and_does_not_freeze_the_appointment(world: World) -> None:
    start = (world.clock.now + timedelta(days=5)).replace(hour=15, minute=0, second=0)
    ahead = world.clock.now + timedelta(days=2)
    await world.salesforce(service_appointment("04l000000000021AAA", start, modified=ahead))
    assert world.rows("salesforce") == [] and world.paubox.messages == []
    [(source, problem)] = world.runtime.ledger.reports.problems(10)
    assert source == "salesforce" and problem.problem is not None
    assert problem.problem.startswith("the event's time (occurred_at) is more than an hour ahead of this server's")
    # the next event, on time, books the appointment
    await world.salesforce(service_appointment("04l000000000022AAA", start, modified=world.clock.now))
    assert ("crm-appointment-booked", "sent") in [r[:2] for r in world.outline("salesforce")]


async def test_an_event_without_a_time_keeps_the_time_remembered(world: World) -> None:
    """Booked (timed), moved by an event without a time, then the booking redelivered: still recognised as
    older than what is remembered, so the appointment does not move back."""
    start = (world.clock.now + timedelta(days=5)).replace(hour=15, minute=0, second=0)
    t0 = world.clock.now - timedelta(minutes=30)
    await world.salesforce(service_appointment("04l000000000031AAA", start, modified=t0 + timedelta(minutes=5)))
    later = start + timedelta(days=1)
    untimed = re.sub(
        rb"<sf:LastModifiedDate>[^<]*</sf:LastModifiedDate>", b"", service_appointment("04l000000000032AAA", later)
    )
    await world.salesforce(untimed)
    await world.salesforce(service_appointment("04l000000000033AAA", start, modified=t0))
    with world.runtime.ledger.engine.connect() as conn:
        [state] = list(conn.execute(select(A).where(A.c.source == "salesforce")))
    assert (state.start, state.last_updated) == (later, t0 + timedelta(minutes=5))
    assert [r[0] for r in world.outline("salesforce") if r[1] == "sent"] == [
        "crm-appointment-booked",
        "crm-appointment-rescheduled",
    ]
    assert len(world.paubox.messages) == 2


async def test_one_replica_at_a_time_processes_the_crm_inbox(world: World) -> None:
    """PostgreSQL: while another replica holds the inbox (an advisory lock), this one leaves the events for
    it, and a replay that would record waits, then gives up with a clear error. SQLite: one process serves
    the ledger (its file lock), so there is nothing to wait for."""
    intake = world.runtime.ledger.intake
    held = intake.try_lock_source(INBOX_LOCK)  # another replica is processing the inbox
    start = (world.clock.now + timedelta(days=5)).replace(hour=15, minute=0, second=0)
    body = service_appointment("04l000000000041AAA", start, modified=world.clock.now)
    assert (await world.client.post(f"/webhooks/crm/salesforce/{SF_TOKEN}", content=body)).status_code == 200
    assert world.runtime.crm is not None
    if intake.dialect == "postgresql":
        assert held is not True
        assert await world.runtime.crm.process() == 0 and len(world.runtime.ledger.inbox.pending(10)) == 1
        with pytest.raises(LedgerError, match=r"another replica kept the CRM inbox for 0\.3 s; replay again later"):
            await world.runtime.crm.lock_inbox(patience=0.3)
        intake.unlock_source(held)
    else:
        assert held is True
    assert await world.runtime.crm.process() == 1 and world.runtime.ledger.inbox.pending(10) == []
    assert [r[0] for r in world.outline("salesforce")][:1] == ["crm-appointment-booked"]


async def test_a_crm_that_cannot_be_read_is_asked_once_per_pass_and_its_events_wait_alone(world: World) -> None:
    start = (world.clock.now + timedelta(days=4)).replace(hour=9, minute=30, second=0)
    for meeting_id in ("911", "912"):
        MEETINGS[meeting_id] = {
            "hs_meeting_start_time": start.isoformat(),
            "hs_meeting_outcome": "SCHEDULED",
            "patient_email": f"guest{meeting_id}@example.org",
        }
    DOWN.append(True)
    occurred = int(world.clock.now.timestamp() * 1000)
    events = [
        {
            "eventId": n,
            "subscriptionType": "object.creation",
            "objectId": n,
            "objectTypeId": "0-47",
            "occurredAt": occurred,
        }
        for n in (911, 912)
    ]
    await world.hubspot(events)
    assert READS == ["911"]  # the second meeting was not asked for: the CRM is down for this pass
    assert len(world.runtime.ledger.inbox.pending(10)) == 2 and world.rows("hubspot") == []
    # a full batch of waiting events does not hold up the events received after them (another CRM's)
    body = service_appointment("04l000000000051AAA", start, modified=world.clock.now)
    assert (await world.client.post(f"/webhooks/crm/salesforce/{SF_TOKEN}", content=body)).status_code == 200
    assert world.runtime.crm is not None
    assert await world.runtime.crm.process(limit=2) == 1
    assert READS == ["911", "911"] and len(world.runtime.ledger.inbox.pending(10)) == 2
    assert [r.mapping for r in world.rows("salesforce")][:1] == ["crm-appointment-booked"]
    DOWN.clear()
    await run_once(world.runtime)
    assert READS[2:4] == ["911", "912"] and world.runtime.ledger.inbox.pending(10) == []  # (then read to send)
    hubspot = sorted(m["recipients"][0] for m in world.paubox.messages if m["recipients"][0].startswith("guest"))
    assert hubspot == ["guest911@example.org", "guest912@example.org"]


async def test_no_patient_data_in_the_logs_reasons_or_problems_of_crm_appointments(world: World) -> None:
    """Booked, moved, a stale redelivery, an unreadable status, an event from the future, a cancellation, a
    replay: the address and the name appear in no log line, no notification's reason, no quarantine record."""
    start = (world.clock.now + timedelta(days=5)).replace(hour=15, minute=0, second=0)
    t0 = world.clock.now - timedelta(minutes=30)
    with capture_logs() as logs:
        await world.salesforce(service_appointment("04l000000000061AAA", start, modified=t0))
        later = start + timedelta(days=1)
        await world.salesforce(service_appointment("04l000000000062AAA", later, modified=t0 + timedelta(minutes=1)))
        await world.salesforce(service_appointment("04l000000000063AAA", start, modified=t0))
        await world.salesforce(service_appointment("04l000000000064AAA", later, "Marmaduke-Pending"))
        ahead = world.clock.now + timedelta(days=3)
        await world.salesforce(service_appointment("04l000000000065AAA", later, modified=ahead))
        cancel = service_appointment("04l000000000066AAA", later, "Canceled", modified=t0 + timedelta(minutes=2))
        await world.salesforce(cancel)
        await replay_crm(world.runtime, "salesforce", None, None, dry=False)
    events = {e["event"] for e in logs}
    assert {"crm.stale", "crm.quarantined", "crm.processed"} <= events
    said = repr(logs)
    reasons = [r.reason for r in world.rows("salesforce") if r.reason]
    problems = [p.problem for _, p in world.runtime.ledger.reports.problems(10)]
    assert len(problems) == 2 and any("withdrawn" in r for r in reasons)
    for text in [said, *reasons, *problems]:
        assert "marmaduke" not in str(text).lower() and "example.org" not in str(text)


async def test_a_sighup_reload_checks_crm_appointment_declarations_as_the_start_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mapping the start refuses (it names a CRM source without `appointment:`) is refused by a SIGHUP
    reload too: the old mappings stay in use and the log names the file and line."""
    from connector.daemon import reload_mappings

    crm_env(monkeypatch)
    monkeypatch.setenv("HUBSPOT_TOKEN", "pat-test-token")
    config = crm_config(tmp_path)
    without(config, SALESFORCE)
    runtime = Runtime.open(load_config(config), Clock())
    try:
        before = runtime.mappings.names()
        booked = tmp_path / "mappings" / "crm-appointment-booked.yaml"
        booked.write_text(booked.read_text().replace("  event: booked\n", "  event: booked\n  sources: [salesforce]\n"))
        with capture_logs() as logs:
            assert await reload_mappings(runtime) is False
        assert runtime.mappings.names() == before
        [failed] = [entry for entry in logs if entry["event"] == "mappings.reload_failed"]
        assert any("source 'salesforce' has no `appointment:` declaration" in p for p in failed["problems"])
    finally:
        await runtime.aclose()


def test_validate_refuses_a_crm_appointment_fhirpath_that_does_not_parse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fhirpathpy reads `payload.objectTypeId ! '0-47'` as `payload.objectTypeId`, true for every event: the
    declaration's FHIRPath is parsed strictly, as a mapping's condition is."""
    crm_env(monkeypatch)
    monkeypatch.setenv("HUBSPOT_TOKEN", "pat-test-token")
    config = crm_config(tmp_path)
    text = config.read_text()
    assert "condition: \"payload.objectTypeId = '0-47'\"" in text
    config.write_text(text.replace("payload.objectTypeId = '0-47'", "payload.objectTypeId ! '0-47'"))
    said = refused_by_validate(config)
    assert "(crm.hubspot.appointment.condition): FHIRPath does not parse, column 22" in said, said
