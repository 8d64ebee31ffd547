"""FHIR Subscription notifications reaching `connector run`: authentication, parsing, gaps, processing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from connector.config import load_config
from connector.daemon import run_once
from connector.delivery.paubox import PauboxRestMailer
from connector.intake.notifications import Notification, gap, parse_bundle
from connector.models import system_clock
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from connector.web.app import create_app as web_app
from connector.web.fhir import FhirEndpoints
from tests.conftest import API_KEY, BASIC, Gate, write_config
from tests.factories import appointment, patient

SECRET = "Bearer subscription-secret-for-tests"
BASE = "http://fhir.test"
SOON = datetime.now(UTC) + timedelta(days=3)
SUBSCRIPTION = (
    "    subscription:\n      enabled: true\n      kind: backport\n      secret: ${SUB_SECRET}\n      heartbeat: 1m\n"
)


def status_bundle(
    kind: str, events_since: int, numbers: list[int], ids: list[str], resources: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": f"{BASE}/Subscription/s1"}},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(events_since)},
    ]
    for number, appointment_id in zip(numbers, ids, strict=True):
        parameters.append(
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": str(number)},
                    {"name": "focus", "valueReference": {"reference": f"{BASE}/Appointment/{appointment_id}"}},
                ],
            }
        )
    entries: list[dict[str, Any]] = [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Parameters", "parameter": parameters}}
    ]
    for resource in resources or []:
        entries.append(
            {
                "fullUrl": f"{BASE}/Appointment/{resource['id']}",
                "resource": resource,
                "request": {"method": "PUT", "url": f"Appointment/{resource['id']}"},
            }
        )
    return {"resourceType": "Bundle", "type": "history", "entry": entries}


class Hub:
    def __init__(self, runtime: Runtime, fhir: FhirState, paubox: SandboxState, client: httpx.AsyncClient) -> None:
        self.runtime, self.fhir, self.paubox, self.client = runtime, fhir, paubox, client

    async def post(self, body: Any, secret: str = SECRET, raw: bytes | None = None) -> httpx.Response:
        content = raw if raw is not None else json.dumps(body).encode()
        return await self.client.post(
            "/fhir/ehr/notify",
            content=content,
            headers={"Authorization": secret, "Content-Type": "application/fhir+json"},
        )


@asynccontextmanager
async def open_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str = ""
) -> AsyncIterator[tuple[Hub, Gate]]:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    monkeypatch.setenv("SUB_SECRET", SECRET)
    config = load_config(
        write_config(
            tmp_path,
            BASE,
            "https://paubox.test",
            mappings=BASIC,
            extra_source=SUBSCRIPTION + source,
            extra="server:\n  port: 9\n  max_body: 50000\n",
        )
    )
    fhir, paubox = FhirState(), SandboxState(api_key=API_KEY, username="clinic")
    fhir.put(patient("p1", "Robin", email="robin@example.org"))
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
    gate = Gate(fhir)
    runtime = Runtime.open(config, system_clock, mailer=mailer, source_transport=gate)
    app = web_app(config, runtime.aftercare, extra_routes=FhirEndpoints(config, runtime.subscriptions).routes())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://connector.test") as client:
        yield Hub(runtime, fhir, paubox, client), gate
    gate.go.set()
    await runtime.aclose()


@pytest.fixture
async def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Hub]:
    async with open_hub(tmp_path, monkeypatch) as (opened, _gate):
        yield opened


def test_history_keeps_the_newest_entry_even_a_delete_without_a_time() -> None:
    from connector.intake.decide import newest_per_id

    deleted = {"resourceType": "Appointment", "id": "a1", "_deleted": True, "meta": {"lastUpdated": None}}
    older = {"resourceType": "Appointment", "id": "a1", "meta": {"lastUpdated": "2026-11-20T10:00:00Z"}}
    assert newest_per_id([deleted, older])["a1"] is deleted
    newer = {"resourceType": "Appointment", "id": "a2", "meta": {"lastUpdated": "2026-11-20T11:00:00Z"}}
    first = {"resourceType": "Appointment", "id": "a2", "meta": {"lastUpdated": "2026-11-20T10:00:00Z"}}
    assert newest_per_id([first, newer])["a2"] is newer  # out of order: the provably newer one wins


def test_backport_bundles_are_read_and_gaps_found() -> None:
    bundle = status_bundle("event-notification", 5, [5], ["a1"])
    notification = parse_bundle(bundle, BASE)
    assert (notification.kind, notification.events_since, notification.focus_ids) == ("event-notification", 5, ["a1"])
    assert not gap(4, notification) and gap(3, notification) and not gap(None, notification)
    heartbeat = Notification("heartbeat", "s1", "active", 5)
    assert not gap(5, heartbeat) and gap(4, heartbeat)


async def test_id_only_event_is_fetched_and_sent_once_even_if_a_poll_sees_it_too(hub: Hub) -> None:
    hub.fhir.put(appointment("a1", "p1", SOON))
    assert (await hub.post(status_bundle("handshake", 0, [], []))).status_code == 200
    assert (await hub.post(status_bundle("event-notification", 1, [1], ["a1"]))).status_code == 200
    await run_once(hub.runtime)  # dispatch; its poll sees the same version
    assert (await hub.post(status_bundle("event-notification", 1, [1], ["a1"]))).status_code == 200
    await run_once(hub.runtime)
    assert [m["recipients"] for m in hub.paubox.messages] == [["robin@example.org"]]


async def test_full_resource_event_is_used_as_sent(hub: Hub) -> None:
    resource = hub.fhir.put(appointment("a2", "p1", SOON))
    assert (await hub.post(status_bundle("event-notification", 1, [1], ["a2"], [resource]))).status_code == 200
    await hub.runtime.dispatcher.run()
    assert len(hub.paubox.messages) == 1


async def test_a_gap_triggers_a_resync_poll(hub: Hub) -> None:
    hub.fhir.put(appointment("missed", "p1", SOON))  # its notification (event 2) never arrived
    await hub.post(status_bundle("heartbeat", 1, [], []))  # we know of event 1
    before = len(hub.fhir.requests)
    await hub.post(status_bundle("heartbeat", 2, [], []))  # the counter says 2: one event is missing
    await hub.runtime.subscriptions.settled("ehr")
    assert any("/Appointment?" in r for r in hub.fhir.requests[before:])
    await hub.runtime.dispatcher.run()
    assert len(hub.paubox.messages) == 1


async def test_pings_during_a_poll_are_served_by_one_more_incremental_poll(hub: Hub) -> None:
    """A change written while a poll runs (after it read the source) is read by the poll its ping asks for,
    not left for the next scheduled poll; pings ask for incremental polls, never a sweep of the overlap."""
    subscriptions = hub.runtime.subscriptions
    poll = subscriptions.poller.poll
    asked: list[bool] = []

    async def watched(name: str, sweep: bool = False, quick: bool = False) -> Any:
        assert quick  # a ping's poll never waits for a sweep
        asked.append(sweep)
        report = await poll(name, sweep=sweep, quick=quick)
        if len(asked) == 1:  # the first poll read the source; now a change and its pings arrive
            hub.fhir.put(appointment("late", "p1", SOON + timedelta(days=2)))
            for _ in range(3):
                ping = await hub.client.post("/fhir/ehr/notify", content=b"", headers={"Authorization": SECRET})
                assert ping.status_code == 200
        return report

    subscriptions.poller.poll = watched  # type: ignore[method-assign]
    hub.fhir.put(appointment("early", "p1", SOON))
    response = await hub.client.post("/fhir/ehr/notify", content=b"", headers={"Authorization": SECRET})
    assert response.status_code == 200
    await subscriptions._resyncs["ehr"]
    assert asked == [False, False]  # three pings during the first poll: one more poll
    await hub.runtime.dispatcher.run()
    assert len(hub.paubox.messages) == 2


async def test_a_ping_during_a_slow_sweep_is_served_before_the_sweep_ends_and_nothing_is_missed_or_doubled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep (here asked for by a gap) re-reads the overlap page by page beside the quick polls that pings
    ask for: held on its second page, it neither holds up a ping's poll nor loses what it alone can find (a
    late commit behind the cursor); every appointment is told once, and the cursor never moves back."""
    async with open_hub(tmp_path, monkeypatch) as (hub, gate):  # 2 appointments a page
        subscriptions, intake = hub.runtime.subscriptions, hub.runtime.ledger.intake
        for number in range(5):
            hub.fhir.put(appointment(f"a{number}", "p1", SOON + timedelta(hours=number)))
        assert (await hub.client.post("/fhir/ehr/notify", content=b"", headers={"Authorization": SECRET})).is_success
        await subscriptions.settled("ehr")  # the first poll of the process: a sweep, read to its end
        cursor = intake.cursor("ehr")
        assert cursor is not None
        # Committed late: stamped a minute behind the cursor, so only a sweep of the overlap finds it.
        hub.fhir.put(appointment("late", "p1", SOON + timedelta(days=1)), when=cursor - timedelta(minutes=1))
        gate.hold = "offset="  # the next pages of a search: the sweep's second page, not a quick poll's first
        await hub.post(status_bundle("heartbeat", 1, [], []))
        await hub.post(status_bundle("heartbeat", 3, [], []))  # event 2 is missing: a sweep, beside
        await asyncio.wait_for(gate.held.wait(), 10)

        hub.fhir.put(appointment("fresh", "p1", SOON + timedelta(days=2)))
        assert (await hub.client.post("/fhir/ehr/notify", content=b"", headers={"Authorization": SECRET})).is_success
        await asyncio.wait_for(asyncio.shield(subscriptions._resyncs["ehr"]), 10)  # not behind the held sweep
        await hub.runtime.dispatcher.run()
        told = [m["custom_headers"]["X-Notification-Key"].split("|")[0] for m in hub.paubox.messages]
        assert "ehr:appointment-booked:fresh" in told
        assert "ehr:appointment-booked:late" in told  # the sweep's first page, committed before it was held
        assert not gate.go.is_set()
        moved = intake.cursor("ehr")
        assert moved is not None and moved > cursor

        gate.go.set()
        await subscriptions.settled("ehr")
        await hub.runtime.dispatcher.run()
        told = [m["custom_headers"]["X-Notification-Key"].split("|")[0] for m in hub.paubox.messages]
        expected = [f"ehr:appointment-booked:{i}" for i in ("a0", "a1", "a2", "a3", "a4", "fresh", "late")]
        assert sorted(told) == expected  # each once
        assert intake.cursor("ehr") == moved  # the sweep ended behind the quick poll: the cursor stayed


async def test_rest_hook_ping_polls_and_put_is_processed(hub: Hub) -> None:
    hub.fhir.put(appointment("a3", "p1", SOON))
    response = await hub.client.post("/fhir/ehr/notify", content=b"", headers={"Authorization": SECRET})
    assert response.status_code == 200
    await hub.runtime.subscriptions._resyncs["ehr"]
    resource = hub.fhir.put(appointment("a4", "p1", SOON + timedelta(days=1)))
    put = await hub.client.put(
        "/fhir/ehr/notify/Appointment/a4", content=json.dumps(resource), headers={"Authorization": SECRET}
    )
    assert put.status_code == 200
    await hub.runtime.dispatcher.run()
    assert len(hub.paubox.messages) == 2


@pytest.mark.parametrize(
    ("headers", "content", "status"),
    [
        ({"Authorization": "Bearer wrong"}, b"{}", 401),
        ({}, b"{}", 401),
        ({"Authorization": SECRET}, b"not json", 400),
        ({"Authorization": SECRET}, json.dumps({"resourceType": "Patient"}).encode(), 400),
        ({"Authorization": SECRET}, json.dumps({"resourceType": "Bundle", "entry": []}).encode(), 400),
        ({"Authorization": SECRET}, b"{" + b" " * 60000 + b"}", 413),
        ({"Authorization": SECRET}, b"[" * 20000 + b"]" * 20000, 400),  # a nesting bomb
        (
            {"Authorization": SECRET},
            json.dumps(
                {
                    "resourceType": "Bundle",
                    "entry": [
                        {
                            "resource": {
                                "resourceType": "SubscriptionStatus",
                                "type": "heartbeat",
                                "subscription": "not-a-reference",
                                "status": {"odd": 1},
                                "eventsSinceSubscriptionStart": "9" * 40,
                            }
                        }
                    ],
                }
            ).encode(),
            200,
        ),
    ],
)
async def test_bad_notifications_are_refused_with_an_operation_outcome(
    hub: Hub, headers: dict[str, str], content: bytes, status: int
) -> None:
    response = await hub.client.post("/fhir/ehr/notify", content=content, headers=headers)
    assert response.status_code == status
    if status != 200:
        assert response.json()["resourceType"] == "OperationOutcome"
    assert hub.paubox.messages == []


async def test_an_invalid_pushed_resource_is_quarantined_and_answered_422(hub: Hub) -> None:
    bad = {"resourceType": "Appointment", "id": "a9", "status": "booked", "participant": [{"status": 5}]}
    response = await hub.client.put(
        "/fhir/ehr/notify/Appointment/a9", content=json.dumps(bad), headers={"Authorization": SECRET}
    )
    assert response.status_code == 422 and "not valid FHIR R4" in response.text


async def test_a_notification_with_poison_resources_answers_422_and_processes_the_others(hub: Hub) -> None:
    """Resources that cannot be processed (an instant beyond the calendar in UTC, CR/LF in a patient
    reference) are quarantined and named in a 422 OperationOutcome; the others in the bundle are processed."""
    good = [hub.fhir.put(appointment(f"g{i}", "p1", SOON + timedelta(days=i))) for i in (1, 2)]
    extreme = {**appointment("x1", "p1", SOON), "start": "9999-12-31T20:00:00-14:00", "meta": {"versionId": "1"}}
    crlf = {
        **appointment("x2", "p1", SOON),
        "meta": {"versionId": "1"},
        "participant": [{"actor": {"reference": "Patient/p1\r\nX"}, "status": "accepted"}],
    }
    resources = [good[0], extreme, crlf, good[1]]
    response = await hub.post(status_bundle("event-notification", 4, [1, 2, 3, 4], ["g1", "x1", "x2", "g2"], resources))
    assert response.status_code == 422
    issues = [issue["diagnostics"] for issue in response.json()["issue"]]
    assert [text.split(" not processed: ")[0] for text in issues] == ["Appointment/x1 v1", "Appointment/x2 v1"]
    assert "Appointment.start" in issues[0] and "participant[0].actor.reference" in issues[1]
    await hub.runtime.dispatcher.run()
    assert len(hub.paubox.messages) == 2
    assert {seen.resource_id for _, seen in hub.runtime.ledger.reports.problems(10)} == {"x1", "x2"}


async def test_a_pushed_appointment_with_an_extreme_date_is_a_4xx_not_a_500(hub: Hub) -> None:
    resource = {**appointment("x3", "p1", SOON), "start": "9999-12-31T20:00:00-14:00"}
    response = await hub.client.put(
        "/fhir/ehr/notify/Appointment/x3", content=json.dumps(resource), headers={"Authorization": SECRET}
    )
    assert response.status_code == 422 and response.json()["resourceType"] == "OperationOutcome"
