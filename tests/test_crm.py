"""CRM webhooks end to end: signed per each spec, stored encrypted before the answer, mapped, sent once."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from connector.config import load_config
from connector.crm.verify import sign_hmac, sign_hubspot_v3, standard_webhook_headers
from connector.daemon import run_once
from connector.delivery.paubox import PauboxRestMailer
from connector.ledger.engine import INBOX
from connector.models import State, system_clock
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from connector.testing import cli, daemon, environment
from connector.web.app import create_app as web_app
from tests.conftest import API_KEY, BASIC, ROOT, Server, free_port, write_config

WH_SECRET = "whsec_" + base64.b64encode(b"standard-webhooks-test-secret-32").decode()
HUB_SECRET = "hubspot-client-secret-for-tests"
HMAC_SECRET = "generic-hmac-secret"
SF_TOKEN = "salesforce-path-token-0123456789"
ORG = "00D5g000004ExAmPLE"
CRM = f"""crm:
  std:
    kind: standard-webhooks
    secret: ${{CRM_STD_SECRET}}
  hubspot:
    kind: hubspot
    secret: ${{CRM_HUB_SECRET}}
    public_url: https://connector.example.org/webhooks/crm/hubspot
  salesforce:
    kind: salesforce-outbound
    path_token: ${{CRM_SF_TOKEN}}
    organization_id: {ORG}
  gen:
    kind: hmac-json
    secret: ${{CRM_GEN_SECRET}}
    rate_limit: 1
    burst: 3
inbox:
  keys:
    k1: ${{INBOX_KEY}}
  current: k1
server:
  host: 127.0.0.1
  port: {{port}}
  max_body: 20000
"""

STD_MAPPING = """name: std-welcome
trigger:
  resource: CrmEvent
  event: patient.registered
  sources: [std]
recipient:
  path: payload.data.email
templates:
  subject: "Welcome to {{ vars.clinic }}"
  text: std-welcome.txt
key: "{{ event_id }}"
vars: {clinic: Example Clinic}
"""

SF_BODY = f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>
 <notifications xmlns="http://soap.sforce.com/2005/09/outbound">
  <OrganizationId>{ORG}</OrganizationId><ActionId>04k5g000000TestAAA</ActionId>
  <Notification><Id>04l5g00000AbCdEAAZ</Id>
   <sObject xsi:type="sf:Event" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">
    <sf:Id>00U5g00000EvEnTAAA</sf:Id><sf:Patient_Email__c>zebulon.sf@example.org</sf:Patient_Email__c>
    <sf:Appointment_Status__c>Booked</sf:Appointment_Status__c>
    <sf:StartDateTime>2026-12-10T15:00:00.000Z</sf:StartDateTime>
   </sObject></Notification>
 </notifications></soapenv:Body></soapenv:Envelope>""".encode()


class Crm:
    def __init__(self, runtime: Runtime, client: httpx.AsyncClient, paubox: SandboxState) -> None:
        self.runtime, self.client, self.paubox = runtime, client, paubox

    async def standard(
        self,
        body: dict[str, Any],
        msg_id: str = "msg_1",
        secret: str = WH_SECRET,
        timestamp: int | None = None,
        raw: bytes | None = None,
    ) -> httpx.Response:
        data = raw if raw is not None else json.dumps(body).encode()
        headers = standard_webhook_headers(secret, msg_id, timestamp or int(time.time()), json.dumps(body).encode())
        return await self.client.post("/webhooks/crm/std", content=data, headers=headers)

    def inbox(self) -> list[Any]:
        with self.runtime.ledger.engine.connect() as conn:
            return list(conn.execute(select(INBOX)))

    async def cycle(self) -> None:
        await run_once(self.runtime)


def crm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    monkeypatch.setenv("CRM_STD_SECRET", WH_SECRET)
    monkeypatch.setenv("CRM_HUB_SECRET", HUB_SECRET)
    monkeypatch.setenv("CRM_SF_TOKEN", SF_TOKEN)
    monkeypatch.setenv("CRM_GEN_SECRET", HMAC_SECRET)
    monkeypatch.setenv("INBOX_KEY", base64.b64encode(os.urandom(32)).decode())


def crm_config(tmp_path: Path, port: int = 9, paubox_url: str = "https://paubox.test") -> Path:
    config = write_config(
        tmp_path, "http://fhir.test", paubox_url, mappings=BASIC, extra=CRM.replace("{port}", str(port))
    )
    mappings = tmp_path / "mappings"
    for name in ("hubspot-appointment-request", "salesforce-appointment-booked"):
        for file in (ROOT / "mappings" / "crm-examples").glob(f"{name}.*"):
            shutil.copy(file, mappings / file.name)
    (mappings / "std-welcome.yaml").write_text(STD_MAPPING)
    (mappings / "std-welcome.txt").write_text("Dear {{ payload.data.name }}, welcome.\n")
    return config


@pytest.fixture
async def crm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Crm]:
    crm_env(monkeypatch)
    config = load_config(crm_config(tmp_path))
    paubox = SandboxState(api_key=API_KEY, username="clinic")
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
    runtime = Runtime.open(
        config, system_clock, mailer=mailer, source_transport=httpx.ASGITransport(app=fhir_app(FhirState()))
    )
    assert runtime.crm_receiver is not None
    app = web_app(config, runtime.aftercare, extra_routes=runtime.crm_receiver.routes())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://connector.example.org"
    ) as client:
        yield Crm(runtime, client, paubox)
    await runtime.aclose()


REGISTERED = {
    "type": "patient.registered",
    "timestamp": "2026-11-21T10:00:00Z",
    "data": {"id": "c1", "email": "quixotica.crm@example.org", "name": "Quixotica"},
}


async def test_standard_webhook_is_stored_then_sent_once_even_when_repeated(crm: Crm) -> None:
    assert (await crm.standard(REGISTERED)).status_code == 204
    assert (await crm.standard(REGISTERED)).status_code == 204  # the sender retries: acknowledged again
    assert len(crm.inbox()) == 1
    await crm.cycle()
    await crm.cycle()
    assert [m["recipients"] for m in crm.paubox.messages] == [["quixotica.crm@example.org"]]
    assert crm.paubox.messages[0]["text"] == "Dear Quixotica, welcome.\n"


@pytest.mark.parametrize("case", ["tampered", "wrong secret", "stale", "future"])
async def test_bad_signatures_and_timestamps_are_refused_and_nothing_stored(crm: Crm, case: str) -> None:
    now = int(time.time())
    if case == "tampered":
        response = await crm.standard(REGISTERED, raw=json.dumps({**REGISTERED, "type": "x"}).encode())
    elif case == "wrong secret":
        response = await crm.standard(REGISTERED, secret="whsec_" + base64.b64encode(b"another-secret").decode())
    else:
        response = await crm.standard(REGISTERED, timestamp=now - 600 if case == "stale" else now + 600)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert crm.inbox() == []


async def test_hubspot_v3_events_each_stored_once(crm: Crm) -> None:
    events = [
        {
            "eventId": 11,
            "subscriptionType": "contact.propertyChange",
            "objectId": 5,
            "propertyName": "appointment_request",
            "propertyValue": "next week",
            "email": "marmaduke.hs@example.org",
            "occurredAt": 1714571998741,
        },
        {"eventId": 12, "subscriptionType": "contact.creation", "objectId": 6},
    ]
    body = json.dumps(events).encode()
    stamp = str(int(time.time() * 1000))
    uri = "https://connector.example.org/webhooks/crm/hubspot"
    headers = {
        "X-HubSpot-Signature-v3": sign_hubspot_v3(HUB_SECRET, "POST", uri, body, stamp),
        "X-HubSpot-Request-Timestamp": stamp,
    }
    for _ in range(2):
        assert (await crm.client.post("/webhooks/crm/hubspot", content=body, headers=headers)).status_code == 204
    assert len(crm.inbox()) == 2
    await crm.cycle()
    assert [m["recipients"] for m in crm.paubox.messages] == [["marmaduke.hs@example.org"]]


async def test_salesforce_outbound_is_acknowledged_and_deduplicated(crm: Crm) -> None:
    for _ in range(2):
        response = await crm.client.post(f"/webhooks/crm/salesforce/{SF_TOKEN}", content=SF_BODY)
        assert response.status_code == 200 and b"<Ack>true</Ack>" in response.content
    assert (await crm.client.post("/webhooks/crm/salesforce/wrong-token", content=SF_BODY)).status_code == 401
    other_org = SF_BODY.replace(ORG.encode(), b"00D000000000001AAA")
    assert (await crm.client.post(f"/webhooks/crm/salesforce/{SF_TOKEN}", content=other_org)).status_code == 400
    await crm.cycle()
    [message] = crm.paubox.messages
    assert message["recipients"] == ["zebulon.sf@example.org"]
    assert "Thursday, December 10, 2026" in message["text"]


async def test_generic_hmac_limits_and_malformed_bodies(crm: Crm) -> None:
    body = json.dumps({"id": "g1", "type": "noop"}).encode()
    good = {"X-Signature": sign_hmac(HMAC_SECRET.encode(), body, "sha256=")}
    assert (await crm.client.post("/webhooks/crm/gen", content=body, headers=good)).status_code == 204
    broken = b"{not json"
    signed = {"X-Signature": sign_hmac(HMAC_SECRET.encode(), broken, "sha256=")}
    bad = await crm.client.post("/webhooks/crm/gen", content=broken, headers=signed)
    assert bad.status_code == 400 and bad.json()["status"] == 400
    huge = await crm.client.post("/webhooks/crm/gen", content=b"x" * 30000, headers=good)
    assert huge.status_code in (413, 429)
    answers = [await crm.client.post("/webhooks/crm/gen", content=body, headers=good) for _ in range(5)]
    limited = [a for a in answers if a.status_code == 429]  # burst 3, then 1 per second
    assert limited and int(limited[0].headers["Retry-After"]) >= 1


async def test_an_event_id_too_long_to_store_is_refused_not_cut(crm: Crm) -> None:
    response = await crm.standard(REGISTERED, msg_id="m" * 300)
    assert response.status_code == 400 and crm.inbox() == []


async def test_unsigned_floods_do_not_use_up_the_rate_limit(crm: Crm) -> None:
    for _ in range(10):
        assert (await crm.client.post("/webhooks/crm/gen", content=b"{}")).status_code == 401
    body = json.dumps({"id": "g2", "type": "noop"}).encode()
    signed = {"X-Signature": sign_hmac(HMAC_SECRET.encode(), body, "sha256=")}
    assert (await crm.client.post("/webhooks/crm/gen", content=body, headers=signed)).status_code == 204


async def test_the_stored_payload_is_not_readable_without_the_key(crm: Crm) -> None:
    await crm.standard(REGISTERED)
    [row] = crm.inbox()
    assert b"quixotica" not in row.sealed.lower() and b"example.org" not in row.sealed
    assert row.key_id == "k1"


async def test_replay_of_the_inbox_sends_nothing_twice(crm: Crm) -> None:
    from connector.commands.run import replay_crm as _replay_crm

    await crm.standard(REGISTERED)
    await crm.cycle()
    replayed = await _replay_crm(crm.runtime, "std", None, None, dry=False)
    assert [i.existing.state for i in replayed.items if i.existing] == [State.SENT]
    assert len(crm.paubox.messages) == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(
        [
            "/webhooks/crm/std",
            "/webhooks/crm/hubspot",
            "/webhooks/crm/gen",
            f"/webhooks/crm/salesforce/{SF_TOKEN}",
            "/webhooks/crm/nope",
            "/webhooks/paubox/token",
        ]
    ),
    body=st.binary(max_size=3000),
    headers=st.dictionaries(
        st.sampled_from(
            [
                "webhook-id",
                "webhook-timestamp",
                "webhook-signature",
                "X-HubSpot-Signature-v3",
                "X-HubSpot-Request-Timestamp",
                "X-Signature",
                "Content-Type",
            ]
        ),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
    ),
)
async def test_arbitrary_requests_never_get_a_5xx(crm: Crm, path: str, body: bytes, headers: dict[str, str]) -> None:
    response = await crm.client.post(path, content=body, headers=headers)
    assert response.status_code < 500


def test_an_event_acknowledged_just_before_a_crash_is_sent_once(
    tmp_path: Path, paubox_state: SandboxState, paubox_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    crm_env(monkeypatch)
    port = free_port()
    config = crm_config(tmp_path, port, paubox_server.url)
    config.write_text(config.read_text().replace("  interval: 1s\n", "  interval: 1h\n"))  # no processing
    with Server(fhir_app(FhirState())) as fhir:
        config.write_text(config.read_text().replace("http://fhir.test", fhir.url))
        with daemon(config, env=environment()) as child:
            body = json.dumps(REGISTERED).encode()
            headers = standard_webhook_headers(WH_SECRET, "msg_crash", int(time.time()), body)

            def post() -> httpx.Response | None:
                with contextlib.suppress(httpx.TransportError):
                    url = f"http://127.0.0.1:{port}/webhooks/crm/std"
                    return httpx.post(url, content=body, headers=headers, timeout=5)
                return None

            answer = child.wait_until(post, seconds=30)
            assert answer.status_code == 204
            child.kill()  # acknowledged, not yet processed
        assert paubox_state.messages == []
        for _ in range(2):
            cli("run", "--once", "--config", str(config), cwd=tmp_path, env=environment())
    assert [m["recipients"] for m in paubox_state.messages] == [["quixotica.crm@example.org"]]
    assert "quixotica" not in (tmp_path / "daemon.log").read_text().lower()


FETCH_MAPPING = """name: hubspot-contact-created
trigger:
  resource: CrmEvent
  event: contact.creation
  sources: [hubspot]
fetch_object: true
recipient:
  path: object.properties.email
templates:
  subject: "Welcome, {{ object.properties.firstname }}"
  text: hubspot-contact-created.txt
key: "{{ event_id }}"
"""


async def test_a_mapping_can_read_the_hubspot_object_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    crm_env(monkeypatch)
    monkeypatch.setenv("HUBSPOT_TOKEN", "pat-test-token")
    api_state = {"down": 1, "calls": 0}

    async def contact(request: Request) -> JSONResponse:
        api_state["calls"] += 1
        if request.headers.get("authorization") != "Bearer pat-test-token":
            return JSONResponse({"message": "unauthorized"}, status_code=401)
        if api_state["down"] > 0:
            api_state["down"] -= 1
            return JSONResponse({"message": "try later"}, status_code=503)
        if request.path_params["id"] != "65":
            return JSONResponse({"message": "not found"}, status_code=404)
        return JSONResponse({"id": "65", "properties": {"email": "ottoline.hs@example.org", "firstname": "Ottoline"}})

    hubspot_api = Starlette(routes=[Route("/crm/v3/objects/contacts/{id}", contact)])
    config_path = crm_config(tmp_path)
    config_path.write_text(
        config_path.read_text().replace(
            "    public_url: https://connector.example.org/webhooks/crm/hubspot\n",
            "    public_url: https://connector.example.org/webhooks/crm/hubspot\n"
            "    api_token: ${HUBSPOT_TOKEN}\n    api_base: https://hubspot.test\n",
        )
    )
    (tmp_path / "mappings" / "hubspot-contact-created.yaml").write_text(FETCH_MAPPING)
    (tmp_path / "mappings" / "hubspot-contact-created.txt").write_text("Hello {{ object.properties.firstname }}\n")
    config = load_config(config_path)
    paubox = SandboxState(api_key=API_KEY, username="clinic")
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
    runtime = Runtime.open(
        config,
        system_clock,
        mailer=mailer,
        source_transport=httpx.ASGITransport(app=fhir_app(FhirState())),
        crm_transport=httpx.ASGITransport(app=hubspot_api),
    )
    assert runtime.crm_receiver is not None
    app = web_app(config, runtime.aftercare, extra_routes=runtime.crm_receiver.routes())
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="https://connector.example.org"
        ) as client:
            events = [
                {"eventId": 21, "subscriptionType": "contact.creation", "objectId": 65},
                {"eventId": 22, "subscriptionType": "contact.creation", "objectId": 66},
            ]
            body = json.dumps(events).encode()
            stamp = str(int(time.time() * 1000))
            uri = "https://connector.example.org/webhooks/crm/hubspot"
            headers = {
                "X-HubSpot-Signature-v3": sign_hubspot_v3(HUB_SECRET, "POST", uri, body, stamp),
                "X-HubSpot-Request-Timestamp": stamp,
            }
            assert (await client.post("/webhooks/crm/hubspot", content=body, headers=headers)).status_code == 204
        await run_once(runtime)  # the API is down for the first read: that notification waits
        await run_once(runtime)
        assert [(m["recipients"], m["subject"]) for m in paubox.messages] == [
            (["ottoline.hs@example.org"], "Welcome, Ottoline")
        ]
        skipped = runtime.ledger.reports.notifications([State.SKIPPED], 10)
        assert [r.reason for r in skipped] == ["the CRM object no longer exists"]
    finally:
        await runtime.aclose()


async def test_refused_requests_are_counted_in_the_ledger_for_status(crm: Crm) -> None:
    from connector import metrics
    from connector.daemon import aftercare

    metrics.take_refused()  # counts of earlier tests in this process
    await crm.standard(REGISTERED, secret="whsec_" + base64.b64encode(b"another-secret").decode())
    await crm.standard(REGISTERED, secret="whsec_" + base64.b64encode(b"another-secret").decode())
    await crm.client.post("/webhooks/crm/nope", content=b"{}")
    await aftercare(crm.runtime)
    counts = {(e, r): n for e, r, n, _ in crm.runtime.ledger.reports.rejections()}
    assert counts == {("crm:std", "signature mismatch"): 2, ("crm", "unknown source"): 1}


REFERRAL_MAPPING = """name: std-referral
trigger:
  resource: CrmEvent
  event: patient.referred
  sources: [std]
recipient:
  path: payload.data.email
templates:
  subject: "Your referral"
  text: std-welcome.txt
key: "{{ payload.data.ref }}"
"""


async def test_crm_events_that_cannot_be_processed_are_quarantined_and_block_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored events that cannot be processed (a key that cannot be stored, a payload that is not an
    object) are quarantined with the reason and shown by `connector status`; the others in the inbox are
    sent. A body that cannot be encoded fails (never in doubt) and a hostile address is never used."""
    from datetime import UTC, datetime

    from connector.commands.ledger import status

    crm_env(monkeypatch)
    path = crm_config(tmp_path)
    (tmp_path / "mappings" / "std-referral.yaml").write_text(REFERRAL_MAPPING)
    config = load_config(path)
    paubox = SandboxState(api_key=API_KEY, username="clinic")
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
    runtime = Runtime.open(
        config, system_clock, mailer=mailer, source_transport=httpx.ASGITransport(app=fhir_app(FhirState()))
    )
    assert runtime.crm_receiver is not None
    keyring = runtime.crm_receiver.keyring

    def stored(event_id: str, event_type: str, payload: Any) -> dict[str, Any]:
        key_id, sealed = keyring.seal("std", event_id, payload)
        return {
            "source": "std",
            "event_id": event_id,
            "event_type": event_type,
            "received_at": datetime.now(UTC),
            "key_id": key_id,
            "sealed": sealed,
        }

    def event(event_id: str, event_type: str, data: dict[str, Any]) -> dict[str, Any]:
        return stored(
            event_id,
            event_type,
            {
                "event_id": event_id,
                "event_type": event_type,
                "object_id": None,
                "occurred_at": None,
                "payload": {"data": data},
            },
        )

    try:
        runtime.ledger.inbox.add(
            [
                event("e1", "patient.registered", {"email": "zebulon.crm@example.org", "name": "Zebulon"}),
                event("e2", "patient.referred", {"email": "ottoline.crm@example.org", "ref": "r\ud800"}),
                stored("e3", "patient.registered", ["not", "an", "object"]),
                event("e4", "patient.referred", {"email": "ottoline.crm@example.org", "ref": "r4", "name": "Ottoline"}),
                event("e5", "patient.registered", {"email": "quixotica.crm@example.org", "name": "Q\ud800"}),
                event("e6", "patient.registered", {"email": "marmaduke\ud800@example.org", "name": "Marmaduke"}),
            ]
        )
        await run_once(runtime)
        await run_once(runtime)
        assert sorted(m["recipients"][0] for m in paubox.messages) == [
            "ottoline.crm@example.org",
            "zebulon.crm@example.org",
        ]
        problems = {seen.version: seen.problem or "" for _, seen in runtime.ledger.reports.problems(10)}
        assert set(problems) == {"e2", "e3"}
        assert "the notification key is longer than 512 characters or holds control characters" in problems["e2"]
        assert "is not a JSON object" in problems["e3"]
        shown = status(config)
        assert shown["quarantined"] == {"std": 2}
        assert [(n.resource_version, n.state) for n in shown["attention"]] == [("e5", State.FAILED)]
        assert "cannot be encoded as JSON" in (shown["attention"][0].reason or "")
        [skipped] = runtime.ledger.reports.notifications([State.SKIPPED], 10)
        assert skipped.resource_version == "e6" and "no usable email address" in (skipped.reason or "")
        assert runtime.ledger.inbox.pending(10) == []
    finally:
        await runtime.aclose()
