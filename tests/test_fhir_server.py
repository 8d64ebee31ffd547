"""The FHIR test server searches, keeps history, fails and notifies the way real R4 servers do."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from connector.fhir import parse_instant
from connector.sandbox.fhir import FhirState, create_app, instant
from connector.sandbox.fhir_subscriptions import BACKPORT, BACKPORT_PROFILE
from tests.conftest import Server, free_port

BASE = "http://fhir.test"
T0 = datetime(2026, 12, 10, 9, 0, tzinfo=UTC)
TOPIC = "http://fhir.test/SubscriptionTopic/appointment-changed"


def appointment(rid: str, start: datetime, *actors: str, status: str = "booked") -> dict[str, Any]:
    return {
        "resourceType": "Appointment",
        "id": rid,
        "status": status,
        "start": instant(start),
        "end": instant(start + timedelta(minutes=30)),
        "participant": [{"actor": {"reference": a}, "status": "accepted"} for a in actors],
    }


def client(state: FhirState) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url=BASE)


def ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((item["url"] for item in bundle["link"] if item["relation"] == relation), None)


def diagnostics(response: httpx.Response) -> str:
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    return str(outcome["issue"][0]["diagnostics"])


@pytest.fixture
def clinic() -> FhirState:
    """Three appointments on two days with different patients, practitioners and locations."""
    state = FhirState()
    state.put(appointment("a1", T0, "Patient/p1", "Practitioner/dr1", "Location/l1"))
    state.put(
        appointment("a2", T0 + timedelta(days=1), "Patient/p2", "Practitioner/dr1", "Location/l2", status="cancelled")
    )
    state.put(appointment("a3", T0 - timedelta(hours=2), "Patient/p1", "Practitioner/dr2", "Location/l2"))
    return state


# --- search ---------------------------------------------------------------------------------------------


async def test_date_range_and_reference_parameters_filter_and_appear_in_the_self_link(clinic: FhirState) -> None:
    """`date` (prefixed, repeatable), `patient`/`practitioner`/`location` (comma lists) and `status` filter
    Appointments; the self link lists exactly the honoured parameters and never an unknown one."""
    async with client(clinic) as http:
        day = (
            await http.get(
                "/Appointment",
                params=[("date", "ge2026-12-10T00:00:00Z"), ("date", "lt2026-12-11T00:00:00Z"), ("foo", "bar")],
            )
        ).json()
        assert sorted(ids(day)) == ["a1", "a3"]
        assert link(day, "self") == (
            f"{BASE}/Appointment?date=ge2026-12-10T00%3A00%3A00Z&date=lt2026-12-11T00%3A00%3A00Z&_count=20"
        )
        whole_day = (await http.get("/Appointment", params={"date": "2026-12-11"})).json()
        assert ids(whole_day) == ["a2"]  # a day without a time is the range of that day
        by_patient = (await http.get("/Appointment", params={"patient": "Patient/p1,p2", "status": "booked"})).json()
        assert sorted(ids(by_patient)) == ["a1", "a3"]
        assert "patient=Patient%2Fp1%2Cp2" in link(by_patient, "self")  # type: ignore[operator]
        absolute = (await http.get("/Appointment", params={"practitioner": f"{BASE}/Practitioner/dr1"})).json()
        assert sorted(ids(absolute)) == ["a1", "a2"]
        both = (
            await http.get(
                "/Appointment", params={"location": "Location/l2", "status": "booked,cancelled", "practitioner": "dr2"}
            )
        ).json()
        assert ids(both) == ["a3"]
        bad = await http.get("/Appointment", params={"date": "ge-tomorrow"})
        assert bad.status_code == 400 and "date" in diagnostics(bad)
        clinic.ignore = {"_lastUpdated", "status"}
        ignored = (await http.get("/Appointment", params={"_lastUpdated": "ge2099-01-01", "status": "x"})).json()
        assert len(ids(ignored)) == 3 and link(ignored, "self") == f"{BASE}/Appointment?_count=20"


async def test_epic_mode_honours_only_its_parameters_and_has_no_history_or_subscriptions(clinic: FhirState) -> None:
    """Epic: patient, date, status, _count and _id only; _lastUpdated, _sort, _include and the other
    references are ignored silently (absent from the self link); _id ignores everything else; no
    history, no Subscription (404 OperationOutcome)."""
    async with client(clinic) as http:
        assert (await http.post("/_test/faults", json={"mode": "epic"})).json()["ok"]
        page = (
            await http.get(
                "/Appointment",
                params=[
                    ("patient", "p1"),
                    ("practitioner", "dr1"),
                    ("_lastUpdated", "ge2099-01-01T00:00:00Z"),
                    ("_sort", "_lastUpdated"),
                    ("_include", "Appointment:patient"),
                    ("_count", "5"),
                ],
            )
        ).json()
        assert sorted(ids(page)) == ["a1", "a3"]
        assert link(page, "self") == f"{BASE}/Appointment?patient=p1&_count=5"
        by_id = (await http.get("/Appointment", params={"_id": "a2", "status": "booked"})).json()
        assert ids(by_id) == ["a2"] and link(by_id, "self") == f"{BASE}/Appointment?_id=a2&_count=20"
        history = await http.get("/Appointment/_history")
        assert history.status_code == 404 and "history" in diagnostics(history)
        subscription = await http.post("/Subscription", json={"resourceType": "Subscription"})
        assert subscription.status_code == 404 and "Subscription" in diagnostics(subscription)
        capability = (await http.get("/metadata")).json()["rest"][0]["resource"]
        assert {r["type"] for r in capability} == {"Appointment", "Patient", "Consent"}
        assert all(i["code"] != "history-type" for r in capability for i in r["interaction"])


@pytest.mark.parametrize(
    ("params", "complaint"),
    [
        ({"status": "booked"}, "requires _id"),
        ({"patient": "p1"}, "needs date"),
        ({"patient": "p1", "date": "2026-12-10T00:00:00Z"}, "needs date"),  # no prefix
        ({"patient": "p1", "date": "ge2026-12-10"}, "needs date"),  # no time
        ([("patient", "p1"), ("location", "l1"), ("date", "ge2026-12-10T00:00:00Z")], "may not be combined"),
        ([("patient", "p1"), ("patient", "p2"), ("date", "ge2026-12-10T00:00:00Z")], "only once"),
        ([("patient", "p1"), ("date", "ge2026-12-10T00:00:00Z"), ("date", "le2026-12-11T00:00:00Z")], "ge + lt"),
    ],
)
async def test_cerner_mode_refuses_searches_oracle_refuses(clinic: FhirState, params: Any, complaint: str) -> None:
    """Oracle Health: _id, or exactly one of patient|practitioner|location with a prefixed timed date (or a
    ge + lt pair); anything else is a 400 OperationOutcome saying what is missing."""
    clinic.mode = "cerner"
    async with client(clinic) as http:
        response = await http.get("/Appointment", params=params)
    assert response.status_code == 400 and complaint in diagnostics(response)


async def test_cerner_mode_sorts_by_start_and_ignores_last_updated_and_include(clinic: FhirState) -> None:
    """Oracle Health: results by `start` ascending; _lastUpdated, _include and _sort ignored; no history and
    no Subscription."""
    clinic.mode = "cerner"
    async with client(clinic) as http:
        page = (
            await http.get(
                "/Appointment",
                params=[
                    ("practitioner", "Practitioner/dr1,dr2"),
                    ("date", "ge2026-12-01T00:00:00Z"),
                    ("date", "lt2026-12-31T00:00:00Z"),
                    ("_lastUpdated", "ge2099-01-01T00:00:00Z"),
                    ("_include", "Appointment:patient"),
                    ("_sort", "-_lastUpdated"),
                ],
            )
        ).json()
        assert ids(page) == ["a3", "a1", "a2"]
        assert "_lastUpdated" not in link(page, "self") and "_include" not in link(page, "self")  # type: ignore[operator]
        single = (await http.get("/Appointment", params={"location": "l2", "date": "gt2026-12-10T12:00:00Z"})).json()
        assert ids(single) == ["a2"]
        assert (await http.get("/Appointment", params={"_id": "a1"})).json()["total"] == 1
        assert (await http.get("/_history")).status_code == 404
        assert (await http.get("/Subscription/x/$status")).status_code == 404


# --- history --------------------------------------------------------------------------------------------


async def test_history_lists_versions_and_deletes_newest_first_in_snapshot_pages() -> None:
    """`_history?_since=&_count=`: one entry per version, newest first, POST/PUT/DELETE; a DELETE entry
    has fullUrl, request and response (204, lastModified) but no resource; `next` links are a snapshot
    that keeps `_since`; the self link reports `_since`."""
    state = FhirState()
    first = state.put(appointment("a1", T0, "Patient/p1"))
    state.put({**first, "status": "cancelled"})
    state.put(appointment("a2", T0, "Patient/p2"))
    state.put({"resourceType": "Patient", "id": "p1"})
    async with client(state) as http:
        assert (await http.delete("/Appointment/a1")).status_code == 204
        since = first["meta"]["lastUpdated"]
        page = (await http.get("/Appointment/_history", params={"_since": since, "_count": "2"})).json()
        assert page["type"] == "history" and page["total"] == 4
        assert link(page, "self") == f"{BASE}/Appointment/_history?_since={since.replace(':', '%3A')}&_count=2"
        deleted, created = page["entry"]
        assert deleted["fullUrl"] == f"{BASE}/Appointment/a1" and "resource" not in deleted
        assert deleted["request"] == {"method": "DELETE", "url": "Appointment/a1"}
        assert deleted["response"]["status"] == "204" and parse_instant(deleted["response"]["lastModified"])
        assert created["request"]["method"] == "POST" and created["resource"]["id"] == "a2"
        state.put(appointment("a3", T0, "Patient/p3"))  # after the snapshot: not in its later pages
        next_url = link(page, "next")
        assert next_url is not None and "_since=" in next_url
        rest = (await http.get(next_url)).json()
        assert [(e["request"]["method"], e["resource"]["meta"]["versionId"]) for e in rest["entry"]] == [
            ("PUT", "2"),
            ("POST", "1"),
        ]
        assert link(rest, "next") is None
        everything = (await http.get("/_history")).json()
        assert {e["fullUrl"].split("/")[-2] for e in everything["entry"]} == {"Appointment", "Patient"}
        assert (await http.get("/Appointment/_history", params={"_since": "yesterday"})).status_code == 400


async def test_deletes_through_python_are_versioned_and_silent_deletes_stay_silent() -> None:
    """`state.delete` records a DELETE version (read answers 410, a re-create is a POST with the next
    version); `state.deleted.add(...)` hides the resource without any history entry."""
    state = FhirState()
    state.put(appointment("a1", T0))
    state.put(appointment("a2", T0))
    when = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
    assert state.delete("Appointment", "a1", when=when) and not state.delete("Appointment", "a1")
    state.deleted.add(("Appointment", "a2"))
    again = state.put(appointment("a1", T0))
    assert again["meta"]["versionId"] == "3"
    methods = [(c.method, c.resource_id, c.version_id) for c in state.history]
    assert methods == [("POST", "a1", "1"), ("POST", "a2", "1"), ("DELETE", "a1", "2"), ("POST", "a1", "3")]
    assert state.history[2].when == when
    async with client(state) as http:
        assert (await http.get("/Appointment/a2")).status_code == 410


async def test_a_late_commit_gets_its_older_timestamp_everywhere() -> None:
    """`put(resource, when=older)` writes that lastUpdated although newer versions are visible: a
    `_lastUpdated=gt{newest}` search misses it, `ge{when}` finds it, history files it by its time."""
    state = FhirState()
    state.put(appointment("a1", T0))
    newest = state.put(appointment("a2", T0))
    newest_time = parse_instant(newest["meta"]["lastUpdated"])
    assert newest_time is not None
    when = newest_time - timedelta(minutes=2)
    late = state.put(appointment("late", T0), when=when)
    assert late["meta"] == {"versionId": "1", "lastUpdated": instant(when)}
    async with client(state) as http:
        after = await http.get("/Appointment", params={"_lastUpdated": f"gt{newest['meta']['lastUpdated']}"})
        assert ids(after.json()) == []
        since = (
            await http.get("/Appointment", params={"_lastUpdated": f"ge{instant(when)}", "_sort": "_lastUpdated"})
        ).json()
        assert ids(since)[0] == "late"
        history = (await http.get("/Appointment/_history")).json()
        assert [e["resource"]["id"] for e in history["entry"]][-1] == "late"


# --- injected failures ----------------------------------------------------------------------------------


async def test_fail_next_answers_the_given_statuses_in_order_for_any_request() -> None:
    """`fail_next` statuses go to the next requests of any kind (200 = serve normally); 503 and 429 carry
    `Retry-After: 1`."""
    state = FhirState()
    state.put(appointment("a1", T0))
    async with client(state) as http:
        assert (await http.post("/_test/faults", json={"fail_next": [503, 429, 200, 500]})).json()["ok"]
        first = await http.get("/Appointment")
        second = await http.put("/Appointment/a1", json=appointment("a1", T0))
        third = await http.get("/Appointment/a1")
        fourth = await http.delete("/Appointment/a1")
        fifth = await http.get("/Appointment/a1")
    assert [r.status_code for r in (first, second, third, fourth, fifth)] == [503, 429, 200, 500, 200]
    assert first.headers["retry-after"] == "1" and second.headers["retry-after"] == "1"
    assert "retry-after" not in fourth.headers and diagnostics(fourth) == "injected failure"


async def test_flaky_reads_fail_randomly_but_reproducibly_with_a_seed() -> None:
    """`flaky` fails that share of searches, reads and history requests with 503/429/500; the same `seed`
    gives the same sequence; writes are never made flaky."""

    async def statuses(flaky: float, seed: int) -> list[int]:
        state = FhirState()
        state.put(appointment("a1", T0))
        async with client(state) as http:
            await http.post("/_test/faults", json={"flaky": flaky, "seed": seed})
            codes = [
                (await http.get(path)).status_code
                for path in ["/Appointment", "/Appointment/a1", "/Appointment/_history"] * 10
            ]
            writes = {(await http.put("/Appointment/a1", json=appointment("a1", T0))).status_code for _ in range(10)}
        assert writes == {200}
        return codes

    sequence = await statuses(0.5, seed=42)
    assert sequence == await statuses(0.5, seed=42)
    assert set(sequence) == {200, 429, 500, 503}
    assert set(await statuses(1.0, seed=1)) <= {429, 500, 503}


# --- subscriptions --------------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A notification endpoint on 127.0.0.1 that records every call and answers `status`."""

    status: int = 204
    calls: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            self.calls.append((request.method, request.url.path, dict(request.headers), await request.body()))
            return Response(status_code=self.status)

        return Starlette(routes=[Route("/{path:path}", hook, methods=["POST", "PUT"])])

    def bundles(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, _, _, body in self.calls]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    with Server(hook.app()) as server:
        hook.url = server.url
        yield hook


@pytest.fixture
async def fhir() -> AsyncIterator[tuple[FhirState, httpx.AsyncClient]]:
    """A server in this test's loop; queued notifications are flushed before the loop ends."""
    state = FhirState()
    async with client(state) as http:
        yield state, http
        await http.post("/_test/flush")


def status_of(bundle: dict[str, Any]) -> dict[str, Any]:
    """The status Parameters of a notification or $status Bundle, as {name: value or [parts]}."""
    values: dict[str, Any] = {}
    for parameter in bundle["entry"][0]["resource"]["parameter"]:
        value = parameter.get("part") or next(v for k, v in parameter.items() if k.startswith("value"))
        if "part" in parameter:
            value = {p["name"]: next(v for k, v in p.items() if k.startswith("value")) for p in value}
        values[parameter["name"]] = value
    return values


def backport(endpoint: str, content: str = "id-only", *filters: str) -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "meta": {"profile": [BACKPORT_PROFILE]},
        "status": "requested",
        "reason": "appointment emails",
        "criteria": TOPIC,
        "_criteria": {"extension": [{"url": BACKPORT + "backport-filter-criteria", "valueString": f} for f in filters]},
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "header": ["Authorization: Bearer hook-secret"],
            "extension": [{"url": BACKPORT + "backport-heartbeat-period", "valueUnsignedInt": 60}],
            "_payload": {"extension": [{"url": BACKPORT + "backport-payload-content", "valueCode": content}]},
        },
    }


async def test_classic_rest_hook_pings_on_matching_creates_and_updates_only(
    fhir: tuple[FhirState, httpx.AsyncClient], receiver: Receiver
) -> None:
    """R4 classic: an empty POST with the channel headers for each create/update whose new version matches
    `criteria`; nothing when an update stops matching, nothing on delete."""
    state, http = fhir
    created = await http.post(
        "/Subscription",
        json={
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "r",
            "criteria": "Appointment?status=booked",
            "channel": {"type": "rest-hook", "endpoint": f"{receiver.url}/ping", "header": ["X-Secret: s1"]},
        },
    )
    assert created.status_code == 201 and created.json()["status"] == "active"
    await http.put("/Appointment/a1", json=appointment("a1", T0))
    state.put(appointment("a1", T0, status="cancelled"))
    state.put(appointment("p0", T0, status="proposed"))
    await http.delete("/Appointment/a1")
    assert (await http.post("/_test/flush")).json() == {"ok": True, "failures": 0}
    [(method, path, headers, body)] = receiver.calls
    assert (method, path, body, headers["x-secret"]) == ("POST", "/ping", b"", "s1")


async def test_classic_rest_hook_with_payload_puts_the_resource_under_the_endpoint(
    fhir: tuple[FhirState, httpx.AsyncClient], receiver: Receiver
) -> None:
    """With `channel.payload`, the endpoint is a base: `PUT {endpoint}/Appointment/{id}` with the resource."""
    state, http = fhir
    await http.post(
        "/Subscription",
        json={
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "r",
            "criteria": "Appointment",
            "channel": {"type": "rest-hook", "endpoint": f"{receiver.url}/fhir", "payload": "application/fhir+json"},
        },
    )
    stored = state.put(appointment("a1", T0))
    await http.post("/_test/flush")
    [(method, path, headers, body)] = receiver.calls
    assert (method, path, headers["content-type"]) == ("PUT", "/fhir/Appointment/a1", "application/fhir+json")
    assert json.loads(body) == stored


async def test_backport_handshake_activates_then_id_only_events_count_changes_and_deletes(
    fhir: tuple[FhirState, httpx.AsyncClient], receiver: Receiver
) -> None:
    """Backport: stored as `requested`, a handshake activates it; each matching change or delete is an
    `event-notification` with a growing counter, the focus as an absolute reference and (id-only) an
    entry with fullUrl and request only; `$status` answers a searchset with a `query-status` Parameters."""
    state, http = fhir
    created = (await http.post("/Subscription", json=backport(f"{receiver.url}/notify"))).json()
    assert created["status"] == "requested"
    sid = created["id"]
    await http.post("/_test/flush")
    assert (await http.get(f"/Subscription/{sid}")).json()["status"] == "active"
    first = state.put(appointment("a1", T0))
    await http.put("/Appointment/a1", json=appointment("a1", T0, status="cancelled"))
    state.delete("Appointment", "a1")
    await http.post("/_test/flush")
    handshake, *events = receiver.bundles()
    assert status_of(handshake)["type"] == "handshake" and len(handshake["entry"]) == 1
    assert [status_of(b)["events-since-subscription-start"] for b in events] == ["1", "2", "3"]
    one = status_of(events[0])
    assert one["subscription"] == {"reference": f"{BASE}/Subscription/{sid}"} and one["topic"] == TOPIC
    assert (one["status"], one["type"]) == ("active", "event-notification")
    assert one["notification-event"] == {
        "event-number": "1",
        "timestamp": first["meta"]["lastUpdated"],
        "focus": {"reference": f"{BASE}/Appointment/a1"},
    }
    assert [b["entry"][1] for b in events] == [
        {"fullUrl": f"{BASE}/Appointment/a1", "request": {"method": method, "url": "Appointment/a1"}}
        for method in ("POST", "PUT", "DELETE")
    ]
    assert all(b["type"] == "history" for b in events)
    _, _, headers, _ = receiver.calls[1]
    assert headers["content-type"] == "application/fhir+json" and headers["authorization"] == "Bearer hook-secret"
    report = (await http.get(f"/Subscription/{sid}/$status")).json()
    assert report["type"] == "searchset"
    assert status_of(report) | {"subscription": None} == {
        "subscription": None,
        "topic": TOPIC,
        "status": "active",
        "type": "query-status",
        "events-since-subscription-start": "3",
    }


async def test_backport_full_resource_and_filters(
    fhir: tuple[FhirState, httpx.AsyncClient], receiver: Receiver
) -> None:
    """`full-resource` entries carry the resource; a filter criteria limits events to what it matches."""
    state, http = fhir
    await http.post("/Subscription", json=backport(f"{receiver.url}/n", "full-resource", "Appointment?location=l1"))
    state.put(appointment("elsewhere", T0, "Location/l2"))
    here = state.put(appointment("here", T0, "Location/l1"))
    state.put({"resourceType": "Patient", "id": "p1"})
    await http.post("/_test/flush")
    [_, event] = receiver.bundles()
    assert event["entry"][1]["resource"] == here and status_of(event)["events-since-subscription-start"] == "1"


async def test_empty_payload_sends_only_the_status_without_focus(
    fhir: tuple[FhirState, httpx.AsyncClient], receiver: Receiver
) -> None:
    """`empty`: the notification holds the status entry only, and the event has no focus."""
    state, http = fhir
    await http.post("/Subscription", json=backport(f"{receiver.url}/n", "empty"))
    state.put(appointment("a1", T0))
    await http.post("/_test/flush")
    event = receiver.bundles()[-1]
    assert len(event["entry"]) == 1 and "focus" not in status_of(event)["notification-event"]


async def test_heartbeats_drops_and_error_status(fhir: tuple[FhirState, httpx.AsyncClient], receiver: Receiver) -> None:
    """A heartbeat does not count as an event; `drop_notifications` counts events it never sends (a gap);
    `subscription_error` makes $status (and notifications) report `error`."""
    state, http = fhir
    sid = (await http.post("/Subscription", json=backport(f"{receiver.url}/n"))).json()["id"]
    await http.post("/_test/flush")
    state.put(appointment("a1", T0))
    assert (await http.post("/_test/faults", json={"drop_notifications": 1})).json()["ok"]
    state.put(appointment("a2", T0))
    state.put(appointment("a3", T0))
    assert (await http.post("/_test/heartbeat")).json() == {"subscriptions": [sid]}
    await http.post("/_test/flush")
    kinds = [(status_of(b)["type"], status_of(b)["events-since-subscription-start"]) for b in receiver.bundles()]
    assert kinds == [("handshake", "0"), ("event-notification", "1"), ("event-notification", "3"), ("heartbeat", "3")]
    state.subscription_error = True
    report = (await http.get(f"/Subscription/{sid}/$status")).json()
    assert status_of(report)["status"] == "error" and status_of(report)["events-since-subscription-start"] == "3"
    assert (await http.get("/Subscription/nope/$status")).status_code == 404


async def test_failed_handshake_sets_error_and_a_client_can_reactivate(
    fhir: tuple[FhirState, httpx.AsyncClient], receiver: Receiver
) -> None:
    """A non-2xx handshake leaves the subscription in `error` (events still counted, not sent); a PUT
    with status `requested` shakes hands again and reactivates it, keeping the counter."""
    state, http = fhir
    receiver.status = 500
    created = (await http.post("/Subscription", json=backport(f"{receiver.url}/n"))).json()
    await http.post("/_test/flush")
    stored = (await http.get(f"/Subscription/{created['id']}")).json()
    assert stored["status"] == "error" and "HTTP 500" in stored["error"]
    assert [(f["type"], f["error"]) for f in state.notification_failures] == [("handshake", "HTTP 500")]
    state.put(appointment("a1", T0))
    await http.post("/_test/flush")
    assert len(receiver.calls) == 1
    receiver.status = 200
    again = await http.put(f"/Subscription/{created['id']}", json={**stored, "status": "requested"})
    assert again.status_code == 200 and again.json()["status"] == "requested"
    await http.post("/_test/flush")
    assert (await http.get(f"/Subscription/{created['id']}")).json()["status"] == "active"
    assert status_of(receiver.bundles()[-1]) | {"subscription": None} == {
        "subscription": None,
        "topic": TOPIC,
        "status": "requested",
        "type": "handshake",
        "events-since-subscription-start": "1",
    }


async def test_failed_notifications_are_recorded_once_and_never_retried(
    fhir: tuple[FhirState, httpx.AsyncClient], receiver: Receiver
) -> None:
    """A non-2xx answer or an unreachable endpoint is recorded in `notification_failures`, once."""
    state, http = fhir
    nowhere = f"http://127.0.0.1:{free_port()}/gone"
    for endpoint in (f"{receiver.url}/busy", nowhere):
        await http.post(
            "/Subscription",
            json={
                "resourceType": "Subscription",
                "status": "requested",
                "reason": "r",
                "criteria": "Appointment",
                "channel": {"type": "rest-hook", "endpoint": endpoint},
            },
        )
    receiver.status = 503
    state.put(appointment("a1", T0))
    assert (await http.post("/_test/flush")).json() == {"ok": True, "failures": 2}
    assert sorted((f["url"], f["error"]) for f in state.notification_failures) == sorted(
        [(f"{receiver.url}/busy", "HTTP 503"), (nowhere, "ConnectError")]
    )
    assert len(receiver.calls) == 1


async def test_invalid_subscriptions_are_refused(fhir: tuple[FhirState, httpx.AsyncClient]) -> None:
    """A Subscription without a usable rest-hook channel or with criteria the server cannot evaluate → 400."""
    _, http = fhir
    base = {"resourceType": "Subscription", "status": "requested", "reason": "r", "criteria": "Appointment"}
    for body in (
        {**base, "channel": {"type": "email", "endpoint": "mailto:x@example.org"}},
        {**base, "channel": {"type": "rest-hook", "endpoint": "ftp://example.org"}},
        {
            **base,
            "criteria": "Observation?code=1",
            "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/x"},
        },
        {
            **base,
            "criteria": "Appointment?date=soon",
            "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/x"},
        },
    ):
        response = await http.post("/Subscription", json=body)
        assert response.status_code == 400, body
        assert "Subscription" in diagnostics(response) or "criteria" in diagnostics(response)


async def test_python_writes_notify_through_a_server_running_on_another_thread(receiver: Receiver) -> None:
    """`state.put` from test code (another thread) queues notifications the running server sends;
    `POST /_test/flush` waits for them."""
    state = FhirState()
    with Server(create_app(state)) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            sid = (await http.post("/Subscription", json=backport(f"{receiver.url}/n"))).json()["id"]
            assert (await http.post("/_test/flush")).json()["ok"]
            for index in range(5):
                state.put(appointment(f"a{index}", T0))
            await http.post("/_test/flush")
            status = (await http.get(f"/Subscription/{sid}/$status")).json()
    numbers = [status_of(b)["notification-event"]["event-number"] for b in receiver.bundles()[1:]]
    assert numbers == ["1", "2", "3", "4", "5"]  # one subscription's notifications are sent in order
    assert status_of(status)["events-since-subscription-start"] == "5"
    assert status_of(receiver.bundles()[1])["subscription"] == {"reference": f"{server.url}/Subscription/{sid}"}
