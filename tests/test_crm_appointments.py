"""CRM bookings with the FHIR lifecycle: a Salesforce service appointment and a HubSpot meeting, described by
their sources' `appointment:` declarations, feed remembered states, confirmations, reminders armed, re-armed
and withdrawn, and cancellations; an event older than the remembered state changes nothing."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import select

from connector.config import load_config
from connector.crm.verify import sign_hubspot_v3
from connector.daemon import run_once
from connector.delivery.paubox import PauboxRestMailer
from connector.errors import ConfigError
from connector.ledger.engine import INBOX, A, N, S
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from connector.web.app import create_app as web_app
from tests.conftest import API_KEY, ROOT, write_config
from tests.test_crm import HUB_SECRET, ORG, SF_TOKEN, crm_env

# The declarations README.md ("CRM appointments") and config.example.yaml show.
SALESFORCE = """    appointment:
      events: [ServiceAppointment]
      id: payload.Id
      start: payload.SchedStartTime
      end: payload.SchedEndTime
      status:
        path: payload.Status
        map: {"None": proposed, Scheduled: booked, Dispatched: booked, "In Progress": arrived,
              Completed: fulfilled, "Cannot Complete": cancelled, Canceled: cancelled}
      recipient: payload.Patient_Email__c
      language: payload.Patient_Language__c
      name: payload.Patient_First_Name__c
      contact: payload.ContactId
"""
HUBSPOT = """    api_token: ${HUBSPOT_TOKEN}
    api_base: https://hubspot.test
    properties: [hs_meeting_start_time, hs_meeting_end_time, hs_meeting_outcome, patient_email, patient_language]
    appointment:
      events: [object.creation, object.propertyChange, object.deletion]
      condition: "payload.objectTypeId = '0-47'"
      fetch_object: true
      object_type: meetings
      id: payload.objectId
      start: object.properties.hs_meeting_start_time
      end: object.properties.hs_meeting_end_time
      status:
        path: object.properties.hs_meeting_outcome
        map: {SCHEDULED: booked, RESCHEDULED: booked, COMPLETED: fulfilled, NO_SHOW: noshow, CANCELED: cancelled}
        default: booked
      recipient: object.properties.patient_email
      language: object.properties.patient_language
"""
CRM = f"""crm:
  salesforce:
    kind: salesforce-outbound
    path_token: ${{CRM_SF_TOKEN}}
    organization_id: {ORG}
    timezone: America/New_York
{SALESFORCE}  hubspot:
    kind: hubspot
    secret: ${{CRM_HUB_SECRET}}
    public_url: https://connector.example.org/webhooks/crm/hubspot
    timezone: Europe/Amsterdam
{HUBSPOT}inbox:
  keys:
    k1: ${{INBOX_KEY}}
  current: k1
server:
  host: 127.0.0.1
  port: 9
"""
KINDS = ("booked", "rescheduled", "cancelled", "reminder-48h", "reminder-2h")
REMINDERS = ["crm-appointment-reminder-2h", "crm-appointment-reminder-48h"]


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


def service_appointment(
    notification: str, start: datetime, status: str = "Scheduled", modified: datetime | None = None
) -> bytes:
    """A Salesforce outbound message for ServiceAppointment 08p1 (its fields as the declaration reads them)."""
    modified = modified or datetime.now(UTC)

    def iso(moment: datetime) -> str:
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    return f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>
 <notifications xmlns="http://soap.sforce.com/2005/09/outbound">
  <OrganizationId>{ORG}</OrganizationId><ActionId>04k5g000000TestAAA</ActionId>
  <Notification><Id>{notification}</Id>
   <sObject xsi:type="sf:ServiceAppointment" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">
    <sf:Id>08p5g00000SeRvAAAA</sf:Id><sf:ContactId>0035g00000CoNtAAAA</sf:ContactId>
    <sf:Patient_Email__c>marmaduke.sa@example.org</sf:Patient_Email__c>
    <sf:Patient_Language__c>nl</sf:Patient_Language__c>
    <sf:Patient_First_Name__c>Marmaduke</sf:Patient_First_Name__c>
    <sf:Status>{status}</sf:Status>
    <sf:SchedStartTime>{iso(start)}</sf:SchedStartTime>
    <sf:SchedEndTime>{iso(start + timedelta(minutes=30))}</sf:SchedEndTime>
    <sf:LastModifiedDate>{iso(modified)}</sf:LastModifiedDate>
   </sObject></Notification>
 </notifications></soapenv:Body></soapenv:Envelope>""".encode()


def crm_config(tmp_path: Path, ledger_url: str | None = None) -> Path:
    config = write_config(
        tmp_path, "http://fhir.test", "https://paubox.test", mappings=(), extra=CRM, ledger_url=ledger_url
    )
    mappings = tmp_path / "mappings"
    for kind in KINDS:
        for file in (ROOT / "mappings").glob(f"appointment-{kind}.*"):
            if file.suffix != ".yaml":
                shutil.copy(file, mappings / file.name)
        shutil.copy(ROOT / "mappings" / "crm-examples" / f"crm-appointment-{kind}.yaml", mappings)
    for file in (ROOT / "mappings").glob("_layout*"):
        shutil.copy(file, mappings / file.name)
    return config


class World:
    def __init__(self, runtime: Runtime, client: httpx.AsyncClient, paubox: SandboxState, clock: Clock) -> None:
        self.runtime, self.client, self.paubox, self.clock = runtime, client, paubox, clock

    async def salesforce(self, body: bytes) -> None:
        response = await self.client.post(f"/webhooks/crm/salesforce/{SF_TOKEN}", content=body)
        assert response.status_code == 200, response.text
        await run_once(self.runtime)

    async def hubspot(self, events: list[dict[str, Any]]) -> None:
        body = json.dumps(events).encode()
        stamp = str(int(time.time() * 1000))
        uri = "https://connector.example.org/webhooks/crm/hubspot"
        headers = {
            "X-HubSpot-Signature-v3": sign_hubspot_v3(HUB_SECRET, "POST", uri, body, stamp),
            "X-HubSpot-Request-Timestamp": stamp,
        }
        assert (await self.client.post("/webhooks/crm/hubspot", content=body, headers=headers)).status_code == 204
        await run_once(self.runtime)

    def rows(self, source: str) -> list[Any]:
        with self.runtime.ledger.engine.connect() as conn:
            return list(conn.execute(select(N).where(N.c.source == source).order_by(N.c.id)))

    def outline(self, source: str) -> list[tuple[str, str, str]]:
        """(mapping, state, due) of each notification, due as hours before the start it was planned for."""
        return sorted((r.mapping, r.state, _due(r)) for r in self.rows(source))


def _due(row: Any) -> str:
    if row.appointment_start is None or row.mapping not in REMINDERS:
        return ""
    return f"{(row.appointment_start - row.due_at) / timedelta(hours=1):g}h before {at(row.appointment_start)}"


MEETINGS: dict[str, dict[str, Any]] = {}
READS: list[str] = []  # the meetings read through the fake HubSpot API, in order
DOWN: list[bool] = []  # not empty: the fake HubSpot API answers 503


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("pg_schema_url"))


@pytest.fixture
async def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ledger_url: str) -> AsyncIterator[World]:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    crm_env(monkeypatch)
    monkeypatch.setenv("HUBSPOT_TOKEN", "pat-test-token")
    MEETINGS.clear()
    READS.clear()
    DOWN.clear()

    async def meeting(request: Request) -> JSONResponse:
        READS.append(request.path_params["id"])
        if DOWN:
            return JSONResponse({"message": "unavailable"}, status_code=503)
        found = MEETINGS.get(request.path_params["id"])
        if found is None:
            return JSONResponse({"message": "not found"}, status_code=404)
        return JSONResponse({"id": request.path_params["id"], "properties": found})

    hubspot_api = Starlette(routes=[Route("/crm/v3/objects/meetings/{id}", meeting)])
    config = load_config(crm_config(tmp_path, ledger_url))
    clock = Clock()
    paubox = SandboxState(api_key=API_KEY, username="clinic")
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
    runtime = Runtime.open(
        config,
        clock,
        mailer=mailer,
        source_transport=httpx.ASGITransport(app=fhir_app(FhirState())),
        crm_transport=httpx.ASGITransport(app=hubspot_api),
    )
    assert runtime.crm_receiver is not None
    app = web_app(config, runtime.aftercare, extra_routes=runtime.crm_receiver.routes())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://connector.example.org"
    ) as client:
        yield World(runtime, client, paubox, clock)
    await runtime.aclose()


def at(moment: datetime) -> str:
    return f"{moment:%d %H:%M}"


async def test_a_salesforce_booking_moves_is_cancelled_and_a_stale_redelivery_changes_nothing(world: World) -> None:
    start = (world.clock.now + timedelta(days=5)).replace(hour=15, minute=0, second=0)
    t0 = world.clock.now - timedelta(minutes=30)

    # booked: a confirmation now, reminders 48 h and 2 h before
    await world.salesforce(service_appointment("04l000000000001AAA", start, modified=t0))
    assert world.outline("salesforce") == [
        ("crm-appointment-booked", "sent", ""),
        ("crm-appointment-reminder-2h", "pending", f"2h before {at(start)}"),
        ("crm-appointment-reminder-48h", "pending", f"48h before {at(start)}"),
    ]
    [confirmation] = world.paubox.messages
    assert confirmation["recipients"] == ["marmaduke.sa@example.org"]
    assert "Beste Marmaduke" in confirmation["text"] and "bevestigd" in confirmation["text"]

    # moved a day later: the old reminders withdrawn, new ones armed, the patient told
    later = start + timedelta(days=1)
    await world.salesforce(service_appointment("04l000000000002AAA", later, modified=t0 + timedelta(minutes=10)))
    assert world.outline("salesforce") == [
        ("crm-appointment-booked", "sent", ""),
        ("crm-appointment-reminder-2h", "cancelled", f"2h before {at(start)}"),
        ("crm-appointment-reminder-2h", "pending", f"2h before {at(later)}"),
        ("crm-appointment-reminder-48h", "cancelled", f"48h before {at(start)}"),
        ("crm-appointment-reminder-48h", "pending", f"48h before {at(later)}"),
        ("crm-appointment-rescheduled", "sent", ""),
    ]
    assert len(world.paubox.messages) == 2

    # the first booking again (a new notification id, its older time): nothing changes, recorded as seen
    before = world.outline("salesforce")
    await world.salesforce(service_appointment("04l000000000003AAA", start, modified=t0))
    assert world.outline("salesforce") == before and len(world.paubox.messages) == 2
    with world.runtime.ledger.engine.connect() as conn:
        [state] = list(conn.execute(select(A).where(A.c.source == "salesforce")))
        assert (state.status, state.start) == ("booked", later)
        stale = conn.execute(select(INBOX.c.id).where(INBOX.c.event_id == "04l000000000003AAA")).scalar()
        seen = list(conn.execute(select(S).where(S.c.resource_type == "CrmEvent", S.c.resource_id == str(stale))))
        assert [r.problem for r in seen] == [None]

    # the 48 h reminder goes out at its time, with the new start
    world.clock.now = later - timedelta(hours=48)
    await run_once(world.runtime)
    assert len(world.paubox.messages) == 3
    reminder = world.paubox.messages[-1]
    assert reminder["recipients"] == ["marmaduke.sa@example.org"]

    # cancelled: the 2 h reminder withdrawn, the patient told
    world.clock.now += timedelta(hours=1)
    await world.salesforce(
        service_appointment("04l000000000004AAA", later, "Canceled", modified=t0 + timedelta(minutes=20))
    )
    assert world.outline("salesforce") == [
        ("crm-appointment-booked", "sent", ""),
        ("crm-appointment-cancelled", "sent", ""),
        ("crm-appointment-reminder-2h", "cancelled", f"2h before {at(start)}"),
        ("crm-appointment-reminder-2h", "cancelled", f"2h before {at(later)}"),
        ("crm-appointment-reminder-48h", "cancelled", f"48h before {at(start)}"),
        ("crm-appointment-reminder-48h", "sent", f"48h before {at(later)}"),
        ("crm-appointment-rescheduled", "sent", ""),
    ]
    assert len(world.paubox.messages) == 4
    world.clock.now = later - timedelta(hours=2)
    await run_once(world.runtime)
    assert len(world.paubox.messages) == 4
    # in the patient's language (nl), with the name and the times in the source's zone
    subjects = [m["subject"].split(" Example Clinic ")[0] for m in world.paubox.messages]
    assert subjects == ["Uw afspraak bij", "Uw afspraak bij", "Herinnering: uw afspraak bij", "Uw afspraak bij"]
    local = f"{later.astimezone(ZoneInfo('America/New_York')):%H:%M} uur"
    assert all(local in m["text"] and "Beste Marmaduke" in m["text"] for m in world.paubox.messages[1:])
    assert "verplaatst" in world.paubox.messages[1]["text"] and "geannuleerd" in world.paubox.messages[3]["text"]


async def test_a_hubspot_meeting_is_read_through_the_api_and_an_end_only_change_sends_nothing(world: World) -> None:
    """Booked, lengthened (nothing sent), cancelled; another one deleted in HubSpot."""
    start = (world.clock.now + timedelta(days=4)).replace(hour=9, minute=30, second=0)

    def meeting(begin: datetime, minutes: int = 30, outcome: str = "SCHEDULED") -> dict[str, str]:
        return {
            "hs_meeting_start_time": begin.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "hs_meeting_end_time": (begin + timedelta(minutes=minutes)).astimezone(UTC).isoformat(),
            "hs_meeting_outcome": outcome,
            "patient_email": "ottoline.hs@example.org",
            "patient_language": "en",
        }

    def event(number: int, kind: str = "object.creation", type_id: str = "0-47") -> dict[str, Any]:
        occurred = int((world.clock.now.timestamp() + number) * 1000)
        return {
            "eventId": number,
            "subscriptionType": kind,
            "objectId": 901,
            "objectTypeId": type_id,
            "occurredAt": occurred,
        }

    MEETINGS["901"] = meeting(start)
    await world.hubspot([event(1), event(2, type_id="0-1")])  # a contact event is no meeting
    assert world.outline("hubspot") == [
        ("crm-appointment-booked", "sent", ""),
        ("crm-appointment-reminder-2h", "pending", f"2h before {at(start)}"),
        ("crm-appointment-reminder-48h", "pending", f"48h before {at(start)}"),
    ]
    assert world.paubox.messages[0]["recipients"] == ["ottoline.hs@example.org"]

    # the visit gets longer, same start: remembered, nothing sent, the reminders stand
    MEETINGS["901"] = meeting(start, minutes=60)
    await world.hubspot([event(3, "object.propertyChange")])
    assert [r[1] for r in world.outline("hubspot")] == ["sent", "pending", "pending"]
    assert len(world.paubox.messages) == 1
    with world.runtime.ledger.engine.connect() as conn:
        [state] = list(conn.execute(select(A).where(A.c.source == "hubspot")))
        assert state.end == start + timedelta(minutes=60)

    # cancelled in HubSpot: reminders withdrawn, the patient told
    MEETINGS["901"] = meeting(start, minutes=60, outcome="CANCELED")
    await world.hubspot([event(4, "object.propertyChange")])
    assert world.outline("hubspot") == [
        ("crm-appointment-booked", "sent", ""),
        ("crm-appointment-cancelled", "sent", ""),
        ("crm-appointment-reminder-2h", "cancelled", f"2h before {at(start)}"),
        ("crm-appointment-reminder-48h", "cancelled", f"48h before {at(start)}"),
    ]

    # another meeting, deleted in HubSpot: its reminders withdrawn, its state forgotten (no email: the
    # address was on the meeting)
    MEETINGS["902"] = meeting(start)
    await world.hubspot([{**event(5), "objectId": 902}])
    assert len(world.paubox.messages) == 3
    del MEETINGS["902"]
    await world.hubspot([{**event(6, "object.deletion"), "objectId": 902}])
    later = [r for r in world.rows("hubspot") if r.resource_id == "902"]
    assert sorted((r.mapping, r.state, r.reason) for r in later if r.mapping in REMINDERS) == [
        (name, "cancelled", "withdrawn: the CRM object was deleted") for name in REMINDERS
    ]
    assert len(world.paubox.messages) == 3
    with world.runtime.ledger.engine.connect() as conn:
        assert conn.execute(select(A.c.deleted).where(A.c.appointment_id == "902")).scalar() is True


def test_a_declaration_with_a_bad_path_is_refused_with_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crm_env(monkeypatch)
    monkeypatch.setenv("HUBSPOT_TOKEN", "pat-test-token")
    path = crm_config(tmp_path)
    path.write_text(path.read_text().replace("start: payload.SchedStartTime", "start: payload.SchedStartTime.nosuch()"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "crm.salesforce.appointment.start" in str(caught.value) and "FHIRPath" in str(caught.value)


async def test_an_appointment_event_the_declaration_cannot_read_is_quarantined_alone(world: World) -> None:
    start = world.clock.now + timedelta(days=3)
    await world.salesforce(service_appointment("04l000000000009AAA", start, "Tentative-Marmaduke"))
    assert world.rows("salesforce") == [] and world.paubox.messages == []
    [(source, problem)] = world.runtime.ledger.reports.problems(10)
    assert (source, problem.resource_type) == ("salesforce", "CrmEvent")
    assert problem.problem == "the status found in the event is not one of status.map"  # the value is not quoted
    await world.salesforce(service_appointment("04l000000000010AAA", start))
    assert ("crm-appointment-booked", "sent") in [r[:2] for r in world.outline("salesforce")]


async def test_a_bounced_crm_address_is_not_written_to_again_until_the_event_gives_another(world: World) -> None:
    """A hard bounce of a CRM appointment's email suppresses the address for that contact, as for a FHIR
    patient: the reminder due to it is skipped with the reason; an event with another address is used."""
    start = (world.clock.now + timedelta(days=5)).replace(hour=15, minute=0, second=0)
    t0 = world.clock.now - timedelta(minutes=30)
    await world.salesforce(service_appointment("04l000000000001AAA", start, modified=t0))
    [confirmation] = world.paubox.messages
    key = confirmation["custom_headers"]["X-Notification-Key"]
    old = "marmaduke.sa@example.org"
    event = {
        "event_name": "api_mail_log_permanent_failure",
        "payload": {"to": old, "time": world.clock.now.isoformat(), "custom_headers": {"X-Notification-Key": key}},
    }
    await world.runtime.aftercare.webhook(event)
    [entry] = world.runtime.ledger.bounces.entries(10)
    assert entry[:2] == ("salesforce", "0035g00000CoNtAAAA") and world.runtime.ledger.optouts.entries() == []
    world.clock.now = start - timedelta(hours=48)
    await run_once(world.runtime)
    assert len(world.paubox.messages) == 1  # not tried again
    [skipped] = [r for r in world.rows("salesforce") if r.mapping == "crm-appointment-reminder-48h"]
    assert skipped.state == "skipped" and "address bounced (hard bounce" in skipped.reason
    assert old not in skipped.reason
    # The CRM gets another address (a later event, same start): the 2-hour reminder goes to it.
    new = service_appointment("04l000000000002AAA", start, modified=t0 + timedelta(minutes=10))
    await world.salesforce(new.replace(old.encode(), b"marmaduke.new@example.org"))
    world.clock.now = start - timedelta(hours=2)
    await run_once(world.runtime)
    assert [m["recipients"] for m in world.paubox.messages] == [[old], ["marmaduke.new@example.org"]]
