"""The FHIR test server takes writes the way an R4 server does: create with Location/ETag, conditional create
that stays single under a race, version-aware update (412 on a stale If-Match), validation, SMART scopes,
searches the write-back needs, history and polls that see writes, and write faults for retry tests.

Everything goes over real HTTP to the server on 127.0.0.1 (the `fhir_server` fixture)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from connector.fhir import parse_instant
from connector.sandbox.fhir import FhirState, WriteFault, instant
from connector.sandbox.fhir_search import build_query
from connector.sandbox.smart_token import ASSERTION_TYPE, SmartTokenState
from connector.sandbox.smart_token import create_app as token_app
from tests.conftest import Server

SYSTEM = "urn:example:connector:notification"
START = datetime(2026, 12, 10, 9, 0, tzinfo=UTC)


def appointment(rid: str = "a1", status: str = "booked") -> dict[str, Any]:
    return {
        "resourceType": "Appointment",
        "id": rid,
        "status": status,
        "start": instant(START),
        "end": instant(START + timedelta(minutes=30)),
        "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}],
    }


def appointment_response(key: str, about: str = "Appointment/a1", status: str = "accepted") -> dict[str, Any]:
    return {
        "resourceType": "AppointmentResponse",
        "identifier": [{"system": SYSTEM, "value": key}],
        "appointment": {"reference": about},
        "actor": {"reference": "Patient/p1"},
        "participantStatus": status,
    }


def communication(key: str, about: str = "Appointment/a1", subject: str = "Patient/p1") -> dict[str, Any]:
    return {
        "resourceType": "Communication",
        "identifier": [{"system": SYSTEM, "value": key}],
        "status": "completed",
        "about": [{"reference": about}],
        "subject": {"reference": subject},
        "recipient": [{"reference": subject}],
        "sent": "2026-12-08T09:00:00Z",
        "medium": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode", "code": "EMAILWRIT"}]}
        ],
    }


def task(key: str, focus: str = "Appointment/a1", patient: str = "Patient/p1") -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "identifier": [{"system": SYSTEM, "value": key}],
        "status": "requested",
        "intent": "order",
        "focus": {"reference": focus},
        "for": {"reference": patient},
        "description": "no usable email address",
    }


WRITTEN = {
    "AppointmentResponse": appointment_response("n-1"),
    "Communication": communication("n-1"),
    "Task": task("n-1"),
    "Appointment": {k: v for k, v in appointment().items() if k != "id"},
}


@pytest.fixture
async def http(fhir_server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fhir_server.url, timeout=10) as client:
        yield client


def diagnostics(response: httpx.Response) -> str:
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    return str(outcome["issue"][0]["diagnostics"])


def ids(bundle: dict[str, Any]) -> list[str]:
    return [entry["resource"]["id"] for entry in bundle.get("entry", [])]


def if_none_exist(key: str) -> dict[str, str]:
    return {"If-None-Exist": f"identifier={SYSTEM}|{key}"}


# --- create ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resource_type", list(WRITTEN))
async def test_create_assigns_id_and_version_and_answers_location_etag_and_last_modified(
    resource_type: str, http: httpx.AsyncClient, fhir_server: Server, fhir_state: FhirState
) -> None:
    """POST [type]: 201; the server assigns id (a client's id is ignored), meta.versionId 1 and
    meta.lastUpdated; Location is [base]/[type]/[id]/_history/1 and reads back the same version; ETag W/"1";
    Last-Modified is meta.lastUpdated; a read of the resource answers the same ETag."""
    response = await http.post(f"/{resource_type}", json={**WRITTEN[resource_type], "id": "chosen-by-client"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["resourceType"] == resource_type and body["id"] != "chosen-by-client"
    assert body["meta"]["versionId"] == "1"
    assert response.headers["location"] == f"{fhir_server.url}/{resource_type}/{body['id']}/_history/1"
    assert response.headers["etag"] == 'W/"1"'
    updated = parse_instant(body["meta"]["lastUpdated"])
    assert updated is not None
    assert parsedate_to_datetime(response.headers["last-modified"]) == updated.replace(microsecond=0)
    assert (await http.get(response.headers["location"])).json() == body
    read = await http.get(f"/{resource_type}/{body['id']}")
    assert read.json() == body and read.headers["etag"] == 'W/"1"' and "last-modified" in read.headers
    assert fhir_state.of_type(resource_type) == [body]


async def test_prefer_return_minimal_answers_headers_only_and_representation_is_the_default(
    http: httpx.AsyncClient,
) -> None:
    """`Prefer: return=minimal` gives 201 with Location and ETag and an empty body; `return=representation`
    and no Prefer give the resource; `return=OperationOutcome` gives an OperationOutcome."""
    minimal = await http.post("/Task", json=task("t-1"), headers={"Prefer": "return=minimal"})
    assert minimal.status_code == 201 and minimal.content == b""
    assert minimal.headers["location"].endswith("/_history/1") and minimal.headers["etag"] == 'W/"1"'
    full = await http.post("/Task", json=task("t-2"), headers={"Prefer": "return=representation"})
    assert full.json()["identifier"][0]["value"] == "t-2"
    assert (await http.post("/Task", json=task("t-3"))).json()["resourceType"] == "Task"
    told = await http.post("/Task", json=task("t-4"), headers={"Prefer": "return=OperationOutcome"})
    assert told.status_code == 201 and told.json()["resourceType"] == "OperationOutcome"


# --- conditional create ---------------------------------------------------------------------------------


async def test_conditional_create_creates_once_then_answers_the_match_and_412_on_several(
    http: httpx.AsyncClient, fhir_state: FhirState
) -> None:
    """If-None-Exist: no match → 201; one match → 200 with that resource, nothing stored; several → 412."""
    first = await http.post("/AppointmentResponse", json=appointment_response("k-1"), headers=if_none_exist("k-1"))
    assert first.status_code == 201
    again = await http.post("/AppointmentResponse", json=appointment_response("k-1"), headers=if_none_exist("k-1"))
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers["etag"] == 'W/"1"' and again.headers["location"] == first.headers["location"]
    assert len(fhir_state.of_type("AppointmentResponse")) == 1
    for copy_id in ("dup-1", "dup-2"):
        fhir_state.put({**communication("k-2"), "id": copy_id})
    several = await http.post("/Communication", json=communication("k-2"), headers=if_none_exist("k-2"))
    assert several.status_code == 412 and "matches 2" in diagnostics(several)
    assert len(fhir_state.of_type("Communication")) == 2
    combined = {"If-None-Exist": f"identifier={SYSTEM}|k-3&about=Appointment/a1&subject=Patient/p1"}
    assert (await http.post("/Communication", json=communication("k-3"), headers=combined)).status_code == 201
    assert (await http.post("/Communication", json=communication("k-3"), headers=combined)).status_code == 200
    assert [(w.interaction, w.status) for w in fhir_state.writes] == [
        ("create", 201),
        ("create", 200),
        ("create", 412),
        ("create", 201),
        ("create", 200),
    ]


async def test_conditional_create_refuses_a_condition_it_would_have_to_ignore(http: httpx.AsyncClient) -> None:
    """A parameter the type does not support, or an empty condition, is a 400 naming it (ignoring it would
    match too much); nothing is stored."""
    unknown = await http.post("/Task", json=task("t"), headers={"If-None-Exist": "identifer=x|y"})
    assert unknown.status_code == 400 and "identifer" in diagnostics(unknown)
    empty = await http.post("/Task", json=task("t"), headers={"If-None-Exist": ""})
    assert empty.status_code == 400 and "empty" in diagnostics(empty)
    assert (await http.get("/Task")).json()["total"] == 0


async def test_twenty_identical_conditional_creates_at_once_store_one_resource(
    http: httpx.AsyncClient, fhir_state: FhirState
) -> None:
    """Twenty concurrent POSTs with the same If-None-Exist: one 201, nineteen 200, all naming one resource
    (the store serialises the search and the write)."""
    fhir_state.latency = 0.05  # every request waits, so all twenty are in flight together

    async def post() -> httpx.Response:
        return await http.post("/Communication", json=communication("race"), headers=if_none_exist("race"))

    answers = await asyncio.gather(*(post() for _ in range(20)))
    assert Counter(a.status_code for a in answers) == {201: 1, 200: 19}
    assert len({a.json()["id"] for a in answers}) == 1
    assert len(fhir_state.search("Communication", f"identifier={SYSTEM}|race")) == 1


def test_conditional_creates_from_test_threads_and_http_at_once_store_one_resource(
    fhir_server: Server, fhir_state: FhirState
) -> None:
    """Ten threads POSTing over HTTP and ten creating through `FhirState.create` with the same condition, all
    at once (the interpreter switching threads as often as it can), five rounds: each round stores one
    resource, because the search and the write share the store's lock across the server's loop and the
    test's threads."""
    for number in range(500):  # other Tasks make each search take a while: a wide window for a race
        fhir_state.put({**task(f"other-{number}"), "id": f"other-{number}"})
    barrier = threading.Barrier(20)
    clients = [httpx.Client(base_url=fhir_server.url, timeout=10) for _ in range(10)]

    def over_http(client: httpx.Client, key: str) -> bool:
        barrier.wait(timeout=30)
        return client.post("/Task", json=task(key), headers=if_none_exist(key)).status_code == 201

    def in_python(key: str) -> bool:
        condition = build_query("Task", [("identifier", f"{SYSTEM}|{key}")])
        barrier.wait(timeout=30)
        return fhir_state.create(task(key), condition)[1]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            for key in ("round-1", "round-2", "round-3", "round-4", "round-5"):
                futures = [pool.submit(over_http, client, key) for client in clients]
                futures += [pool.submit(in_python, key) for _ in range(10)]
                created = [future.result(timeout=30) for future in futures]
                found = fhir_state.search("Task", f"identifier={SYSTEM}|{key}")
                assert (created.count(True), len(found)) == (1, 1), key
    finally:
        sys.setswitchinterval(interval)
        for client in clients:
            client.close()


async def test_without_conditional_create_support_the_header_is_ignored_and_the_capability_says_so(
    http: httpx.AsyncClient,
) -> None:
    """`conditional_create: false` imitates a server without it: If-None-Exist is ignored (a duplicate is
    stored) and the CapabilityStatement says conditionalCreate false."""
    statement = (await http.get("/metadata")).json()["rest"][0]["resource"]
    communication_entry = next(r for r in statement if r["type"] == "Communication")
    assert communication_entry["conditionalCreate"] is True and communication_entry["versioning"] == "versioned-update"
    assert {"create", "update", "vread"} <= {i["code"] for i in communication_entry["interaction"]}
    assert (await http.post("/_test/faults", json={"conditional_create": False})).json()["ok"]
    for _ in range(2):
        assert (await http.post("/Task", json=task("x"), headers=if_none_exist("x"))).status_code == 201
    assert (await http.get("/Task", params={"identifier": f"{SYSTEM}|x"})).json()["total"] == 2
    statement = (await http.get("/metadata")).json()["rest"][0]["resource"]
    assert next(r for r in statement if r["type"] == "Task")["conditionalCreate"] is False


# --- update ---------------------------------------------------------------------------------------------


async def test_if_match_updates_only_the_current_version_and_412_otherwise(
    http: httpx.AsyncClient, fhir_state: FhirState
) -> None:
    """PUT with If-Match W/"1" on version 1 → 200 version 2 with ETag W/"2"; the same stale If-Match again →
    412 OperationOutcome and nothing stored; without If-Match → a plain update; on a resource that does not
    exist → 412; a malformed If-Match → 400; DELETE with a stale If-Match → 412."""
    fhir_state.put(appointment())
    cancelled = {**appointment(status="cancelled"), "cancelationReason": {"coding": [{"code": "pat-crs"}]}}
    updated = await http.put("/Appointment/a1", json=cancelled, headers={"If-Match": 'W/"1"'})
    assert updated.status_code == 200 and updated.headers["etag"] == 'W/"2"'
    assert updated.json()["status"] == "cancelled" and updated.json()["meta"]["versionId"] == "2"
    stale = await http.put("/Appointment/a1", json=appointment(), headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412 and "version 2" in diagnostics(stale)
    assert [v["meta"]["versionId"] for v in fhir_state.versions("Appointment", "a1")] == ["1", "2"]
    assert (await http.put("/Appointment/a1", json=appointment())).status_code == 200
    missing = await http.put("/Appointment/nope", json=appointment("nope"), headers={"If-Match": 'W/"1"'})
    assert missing.status_code == 412 and fhir_state.current("Appointment", "nope") is None
    bad = await http.put("/Appointment/a1", json=appointment(), headers={"If-Match": "1"})
    assert bad.status_code == 400 and "If-Match" in diagnostics(bad)
    assert (await http.delete("/Appointment/a1", headers={"If-Match": 'W/"2"'})).status_code == 412
    assert (await http.delete("/Appointment/a1", headers={"If-Match": 'W/"3"'})).status_code == 204


async def test_put_creates_with_201_and_refuses_an_id_that_disagrees_with_the_url(http: httpx.AsyncClient) -> None:
    """PUT of a new id creates it (201, version 1); a body whose id or resourceType differs from the URL is a
    400, as is an id that is not a FHIR id."""
    created = await http.put("/Task/t1", json={**task("k"), "id": "t1"})
    assert created.status_code == 201 and created.headers["location"].endswith("/Task/t1/_history/1")
    other = await http.put("/Task/t1", json={**task("k"), "id": "t2"})
    assert other.status_code == 400 and "id" in diagnostics(other)
    wrong = await http.put("/Task/t1", json={**communication("k"), "id": "t1"})
    assert wrong.status_code == 400 and "Communication" in diagnostics(wrong)
    assert (await http.put("/Task/not_an_id!", json=task("k"))).status_code == 400


# --- validation -----------------------------------------------------------------------------------------


async def test_invalid_bodies_are_refused_with_an_operation_outcome_naming_elements_not_values(
    http: httpx.AsyncClient, fhir_state: FhirState
) -> None:
    """An unknown element, a missing required element or a code outside a required binding → 422 naming
    the element path (never its value); not JSON → 400; an unknown type → 404; nothing is stored."""
    unknown = await http.post("/Communication", json={**communication("k"), "patientName": "Robin Example"})
    assert unknown.status_code == 422 and "patientName" in diagnostics(unknown)
    assert "Robin" not in unknown.text
    no_status = {k: v for k, v in appointment_response("k").items() if k != "participantStatus"}
    missing = await http.post("/AppointmentResponse", json=no_status)
    assert missing.status_code == 422 and "participantStatus" in diagnostics(missing)
    maybe = await http.post("/AppointmentResponse", json=appointment_response("k", status="maybe"))
    assert maybe.status_code == 422 and "participantStatus" in diagnostics(maybe) and "maybe" not in maybe.text
    wrong_type = await http.post("/Task", json={**task("k"), "for": "Patient/p1"})
    assert wrong_type.status_code == 422 and "for" in diagnostics(wrong_type)
    bad_put = await http.put("/Appointment/a1", json={**appointment(), "status": "done"})
    assert bad_put.status_code == 422
    assert (await http.post("/Task", content=b"{not json")).status_code == 400
    assert (await http.post("/Nonsense", json={"resourceType": "Nonsense"})).status_code == 404
    assert all(not fhir_state.of_type(t) for t in ("Communication", "AppointmentResponse", "Task", "Appointment"))
    assert {w.status for w in fhir_state.writes} == {400, 404, 422}


# --- searches -------------------------------------------------------------------------------------------


async def test_searches_the_write_back_needs(http: httpx.AsyncClient, fhir_state: FhirState) -> None:
    """AppointmentResponse by appointment + identifier, Communication by identifier + about + subject, Task
    by identifier + focus + patient (its `for`), `_id`, and identifier forms system|value, value, system|."""
    for key, about in (("r1", "Appointment/a1"), ("r2", "Appointment/a2")):
        fhir_state.put({**appointment_response(key, about), "id": key})
        fhir_state.put({**communication(key, about), "id": key})
        fhir_state.put({**task(key, about), "id": key})
    fhir_state.put({**communication("r3", subject="Patient/p2"), "id": "r3"})
    fhir_state.put({**task("r4", patient="Group/g1"), "id": "r4"})

    async def found(path: str, **params: str) -> list[str]:
        response = await http.get(path, params=params)
        assert response.status_code == 200, response.text
        return sorted(ids(response.json()))

    assert await found("/AppointmentResponse", appointment="Appointment/a1", identifier=f"{SYSTEM}|r1") == ["r1"]
    assert await found("/AppointmentResponse", appointment="a2") == ["r2"]
    one = {"identifier": f"{SYSTEM}|r1", "about": "Appointment/a1", "subject": "Patient/p1"}
    assert await found("/Communication", **one) == ["r1"]
    assert await found("/Communication", about="Appointment/a1") == ["r1", "r3"]
    assert await found("/Communication", subject="Patient/p2") == ["r3"]
    assert await found("/Communication", about="Appointment/a9") == []
    assert await found("/Task", identifier=f"{SYSTEM}|r2", focus="Appointment/a2", patient="p1") == ["r2"]
    assert await found("/Task", patient="Patient/p1") == ["r1", "r2"]
    assert await found("/Task", subject="Group/g1") == ["r4"]
    assert await found("/Task", identifier="r4") == ["r4"]
    assert await found("/Task", identifier=f"{SYSTEM}|") == ["r1", "r2", "r4"]
    assert await found("/Task", identifier="urn:other|r4") == []
    assert await found("/Task", _id="r1,r4") == ["r1", "r4"]
    assert [r["id"] for r in fhir_state.search("Task", "focus=Appointment/a2")] == ["r2"]


async def test_written_resources_page_like_appointments(http: httpx.AsyncClient) -> None:
    """`_count` pages the new types with `next` links like Appointment searches; the pages hold every match once."""
    for number in range(5):
        assert (await http.post("/Communication", json=communication(f"p{number}"))).status_code == 201
    page = (await http.get("/Communication", params={"about": "Appointment/a1", "_count": "2"})).json()
    seen = ids(page)
    while next_url := next((link["url"] for link in page["link"] if link["relation"] == "next"), None):
        page = (await http.get(next_url)).json()
        seen += ids(page)
    assert page["total"] == 5 and len(seen) == 5 == len(set(seen))


# --- history and polling --------------------------------------------------------------------------------


async def test_an_appointment_cancelled_through_put_is_seen_by_the_next_poll_and_in_history(
    http: httpx.AsyncClient, fhir_state: FhirState
) -> None:
    """A poller's cursor at the booked version's lastUpdated: after a version-aware PUT cancels it, the next
    `_lastUpdated=gt{cursor}` search returns the cancelled version, and `_history?_since` lists the PUT and
    a created Communication; the instance history lists both versions."""
    booked = fhir_state.put(appointment())
    cursor = booked["meta"]["lastUpdated"]
    poll = {"_lastUpdated": f"gt{cursor}", "_sort": "_lastUpdated"}
    assert ids((await http.get("/Appointment", params=poll)).json()) == []
    etag = (await http.get("/Appointment/a1")).headers["etag"]
    await http.put("/Appointment/a1", json=appointment(status="cancelled"), headers={"If-Match": etag})
    await http.post("/Communication", json=communication("h-1"))
    seen = (await http.get("/Appointment", params=poll)).json()
    assert [(e["resource"]["id"], e["resource"]["status"]) for e in seen["entry"]] == [("a1", "cancelled")]
    assert seen["entry"][0]["resource"]["meta"]["lastUpdated"] > cursor
    history = (await http.get("/_history", params={"_since": cursor})).json()
    methods = [(e["request"]["method"], e["request"]["url"].split("/")[0]) for e in history["entry"]]
    assert methods == [("POST", "Communication"), ("PUT", "Appointment"), ("POST", "Appointment")]
    versions = (await http.get("/Appointment/a1/_history")).json()
    assert [e["resource"]["status"] for e in versions["entry"]] == ["cancelled", "booked"]
    assert (await http.get("/Appointment/a1/_history/1")).json()["status"] == "booked"
    assert (await http.get("/Appointment/a1/_history/9")).status_code == 404


# --- write faults ---------------------------------------------------------------------------------------


async def test_a_write_failing_before_commit_stores_nothing_and_a_retry_creates_one(
    http: httpx.AsyncClient, fhir_state: FhirState
) -> None:
    """`write_faults: [{status: 503}]`: the write answers 503 with Retry-After and stores nothing; reads are
    untouched; the retry creates the resource."""
    profile = {"write_faults": [{"status": 503}]}
    assert (await http.post("/_test/faults", json=profile)).json()["ok"]
    assert (await http.get("/Task")).status_code == 200  # reads do not consume write faults
    failed = await http.post("/Task", json=task("f-1"), headers=if_none_exist("f-1"))
    assert failed.status_code == 503 and failed.headers["retry-after"] == "1"
    assert fhir_state.of_type("Task") == []
    retried = await http.post("/Task", json=task("f-1"), headers=if_none_exist("f-1"))
    assert retried.status_code == 201 and len(fhir_state.of_type("Task")) == 1


async def test_a_write_failing_after_commit_is_stored_and_a_conditional_retry_finds_it(
    http: httpx.AsyncClient, fhir_state: FhirState
) -> None:
    """`after_commit`: the Communication is stored but the answer is a 500; a retry with If-None-Exist gets
    200 and the same resource, so exactly one exists; `writes` records both."""
    fhir_state.write_faults = [WriteFault(status=500, after_commit=True)]
    lost = await http.post("/Communication", json=communication("c-1"), headers=if_none_exist("c-1"))
    assert lost.status_code == 500 and len(fhir_state.of_type("Communication")) == 1
    retried = await http.post("/Communication", json=communication("c-1"), headers=if_none_exist("c-1"))
    assert retried.status_code == 200 and [retried.json()] == fhir_state.of_type("Communication")
    assert [(w.status, w.resource_id) for w in fhir_state.writes] == [
        (500, retried.json()["id"]),
        (200, retried.json()["id"]),
    ]


async def test_a_write_that_hangs_after_commit_times_the_client_out_but_is_stored(
    http: httpx.AsyncClient, fhir_state: FhirState
) -> None:
    """`{hang_s: 30, after_commit: true}`: the client times out while the update is already stored; the
    server lets go of the request as soon as the client has gone."""
    fhir_state.put(appointment())
    assert (await http.post("/_test/faults", json={"write_faults": [{"hang_s": 30, "after_commit": True}]})).json()[
        "ok"
    ]
    began = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await http.put("/Appointment/a1", json=appointment(status="cancelled"), timeout=0.5)
    current = fhir_state.current("Appointment", "a1")
    assert current is not None and current["status"] == "cancelled"
    deadline = time.monotonic() + 5
    while not fhir_state.writes and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert [w.status for w in fhir_state.writes] == [200] and time.monotonic() - began < 5


async def test_a_bad_write_fault_profile_is_refused(http: httpx.AsyncClient) -> None:
    """A write fault that is not an object of status/after_commit/hang_s is a 400 saying the form."""
    refused = await http.post("/_test/faults", json={"write_faults": [503]})
    assert refused.status_code == 400 and "status" in refused.json()["error"]


# --- SMART scopes ---------------------------------------------------------------------------------------


@pytest.fixture
def token_server() -> Iterator[tuple[SmartTokenState, Server, ec.EllipticCurvePrivateKey]]:
    key = ec.generate_private_key(ec.SECP384R1())
    state = SmartTokenState()
    state.register("connector-test", "ec-1", key.public_key())
    with Server(token_app(state)) as server:
        yield state, server, key


async def token(server: Server, key: ec.EllipticCurvePrivateKey, scope: str) -> str:
    """A bearer token from the SMART token server, by a signed client assertion (client_credentials)."""
    endpoint = f"{server.url}/token"
    claims = {
        "iss": "connector-test",
        "sub": "connector-test",
        "aud": endpoint,
        "exp": int(time.time()) + 120,
        "jti": uuid.uuid4().hex,
    }
    assertion = jwt.encode(claims, key, algorithm="ES384", headers={"kid": "ec-1", "typ": "JWT"})
    form = {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
    }
    async with httpx.AsyncClient() as client:
        answer = await client.post(endpoint, data=form)
    answer.raise_for_status()
    return str(answer.json()["access_token"])


async def test_smart_system_scopes_are_enforced_per_interaction_when_turned_on(
    http: httpx.AsyncClient,
    fhir_state: FhirState,
    token_server: tuple[SmartTokenState, Server, ec.EllipticCurvePrivateKey],
) -> None:
    """With the token server as authorizer and `enforce_scopes`, a token for `system/AppointmentResponse.c
    system/Appointment.rs` may create AppointmentResponses and read and search Appointments, but an update
    of the Appointment or a Communication create is 403 naming the missing scope; v1 `system/*.write` and
    v2 `system/Appointment.u` allow the update; with enforcement off the narrow token may do everything."""
    tokens, server, key = token_server
    fhir_state.put(appointment())
    fhir_state.authorizer = tokens.check
    fhir_state.enforce_scopes = True
    narrow = {
        "Authorization": f"Bearer {await token(server, key, 'system/AppointmentResponse.c system/Appointment.rs')}"
    }
    assert (await http.get("/Appointment/a1")).status_code == 401
    assert (
        await http.post("/AppointmentResponse", json=appointment_response("s-1"), headers=narrow)
    ).status_code == 201
    assert (await http.get("/Appointment/a1", headers=narrow)).status_code == 200
    assert (await http.get("/Appointment", params={"_count": "1"}, headers=narrow)).status_code == 200
    update = await http.put("/Appointment/a1", json=appointment(status="cancelled"), headers=narrow)
    assert update.status_code == 403 and "system/Appointment.u" in diagnostics(update)
    created = await http.post("/Communication", json=communication("s-1"), headers=narrow)
    assert created.status_code == 403 and "system/Communication.c" in diagnostics(created)
    read = await http.get("/AppointmentResponse", headers=narrow)
    assert read.status_code == 403 and "system/AppointmentResponse.s" in diagnostics(read)
    assert (await http.get("/_history", headers=narrow)).status_code == 403
    for scope in ("system/*.write", "system/Appointment.u"):
        wide = {"Authorization": f"Bearer {await token(server, key, scope)}"}
        assert (await http.put("/Appointment/a1", json=appointment(), headers=wide)).status_code == 200
    fhir_state.enforce_scopes = False
    assert (await http.post("/Communication", json=communication("s-2"), headers=narrow)).status_code == 201
