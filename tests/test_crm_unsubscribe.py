"""CRM emails carry the one-click unsubscribe too (with `links:`): the link opts out the address the email
went to, and the next CRM email to it is not sent; another address still gets its email."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from connector.config import load_config
from connector.crm.verify import standard_webhook_headers
from connector.daemon import run_once, web_app
from connector.delivery.paubox import PauboxRestMailer
from connector.models import State, system_clock
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from tests.conftest import API_KEY, BASIC, write_config

PUBLIC = "https://connector.example.org"
WH_SECRET = "whsec_" + base64.b64encode(b"standard-webhooks-test-secret-32").decode()
EXTRA = f"""crm:
  std:
    kind: standard-webhooks
    secret: ${{CRM_STD_SECRET}}
inbox:
  keys:
    k1: ${{INBOX_KEY}}
  current: k1
server:
  port: 9
  public_url: {PUBLIC}
links:
  keys:
    l1: ${{LINK_KEY}}
  current: l1
"""
MAPPING = """name: std-welcome
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


def registered(address: str) -> dict[str, object]:
    return {"type": "patient.registered", "timestamp": "2026-11-21T10:00:00Z", "data": {"email": address}}


@pytest.fixture
async def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Runtime, SandboxState]]:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    monkeypatch.setenv("CRM_STD_SECRET", WH_SECRET)
    monkeypatch.setenv("INBOX_KEY", base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("LINK_KEY", base64.b64encode(os.urandom(32)).decode())
    path = write_config(tmp_path, "http://fhir.test", "https://paubox.test", mappings=BASIC, extra=EXTRA)
    (tmp_path / "mappings" / "std-welcome.yaml").write_text(MAPPING)
    (tmp_path / "mappings" / "std-welcome.txt").write_text(
        "Welcome.\n{% if unsubscribe_url %}Stop these emails: {{ unsubscribe_url }}\n{% endif %}"
    )
    config = load_config(path)
    paubox = SandboxState(api_key=API_KEY, username="clinic")
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
    runtime = Runtime.open(
        config, system_clock, mailer=mailer, source_transport=httpx.ASGITransport(app=fhir_app(FhirState()))
    )
    yield runtime, paubox
    await runtime.aclose()


async def test_a_crm_email_carries_one_click_unsubscribe_that_stops_the_next_one(
    world: tuple[Runtime, SandboxState],
) -> None:
    runtime, paubox = world
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=web_app(runtime)), base_url=PUBLIC) as client:

        async def event(msg_id: str, address: str) -> None:
            body = json.dumps(registered(address)).encode()
            headers = standard_webhook_headers(WH_SECRET, msg_id, int(time.time()), body)
            assert (await client.post("/webhooks/crm/std", content=body, headers=headers)).status_code == 204
            await run_once(runtime)

        await event("msg_1", "quixotica.crm@example.org")
        [first] = paubox.messages
        header = first["headers"]["List-Unsubscribe"]
        assert first["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        url = header.strip("<>")
        assert url.startswith(f"{PUBLIC}/links/unsubscribe/") and f"Stop these emails: {url}\n" in first["text"]
        assert "quixotica" not in url
        page = await client.get(url)
        assert page.status_code == 200 and runtime.ledger.optouts.entries() == []
        answer = await client.post(url, data={"List-Unsubscribe": "One-Click"})
        assert (answer.status_code, answer.text) == (200, "done")
        [entry] = runtime.ledger.optouts.entries()
        assert (entry.kind, entry.category, entry.origin) == ("email", "", "link")

        await event("msg_2", "quixotica.crm@example.org")  # opted out: not sent
        await event("msg_3", "zebulon.crm@example.org")  # another address: sent
    assert [m["recipients"] for m in paubox.messages] == [["quixotica.crm@example.org"], ["zebulon.crm@example.org"]]
    skipped = [r for r in runtime.ledger.reports.notifications(list(State), 10) if r.state is State.SKIPPED]
    assert [r.reason for r in skipped] == [f"the address opted out (link, {entry.created_at.date().isoformat()})"]


async def test_a_crm_appointment_email_carries_one_click_unsubscribe_that_withdraws_its_reminders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import timedelta

    from starlette.applications import Starlette

    from connector.web.app import create_app as crm_app
    from tests.test_crm import crm_env
    from tests.test_crm_appointments import Clock, World, crm_config, service_appointment

    crm_env(monkeypatch)
    monkeypatch.setenv("HUBSPOT_TOKEN", "pat-test-token")
    monkeypatch.setenv("LINK_KEY", base64.b64encode(os.urandom(32)).decode())
    path = crm_config(tmp_path)
    server = "server:\n  host: 127.0.0.1\n  port: 9\n"
    text = path.read_text()
    assert server in text
    links = f"{server}  public_url: {PUBLIC}\nlinks:\n  keys:\n    l1: ${{LINK_KEY}}\n  current: l1\n"
    path.write_text(text.replace(server, links))
    for mapping in (tmp_path / "mappings").glob("crm-appointment-*.yaml"):
        mapping.write_text(mapping.read_text() + "category: appointments\n")
    config = load_config(path)
    clock, paubox = Clock(), SandboxState(api_key=API_KEY, username="clinic")
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
    runtime = Runtime.open(
        config,
        clock,
        mailer=mailer,
        source_transport=httpx.ASGITransport(app=fhir_app(FhirState())),
        crm_transport=httpx.ASGITransport(app=Starlette()),
    )
    try:
        assert runtime.crm_receiver is not None
        receiver = crm_app(config, runtime.aftercare, extra_routes=runtime.crm_receiver.routes())
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver), base_url=PUBLIC) as crm_client,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=web_app(runtime)), base_url=PUBLIC) as patient,
        ):
            world = World(runtime, crm_client, paubox, clock)
            start = (clock.now + timedelta(days=5)).replace(hour=15, minute=0, second=0)
            await world.salesforce(service_appointment("04l000000000001AAA", start, modified=clock.now))
            [confirmation] = paubox.messages
            headers = confirmation["headers"]
            assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
            url = headers["List-Unsubscribe"].strip("<>")
            assert url.startswith(f"{PUBLIC}/links/unsubscribe/")
            answer = await patient.post(url, data={"List-Unsubscribe": "One-Click"})
            assert answer.status_code == 200
            reminders = [r.state for r in world.rows("salesforce") if "reminder" in r.mapping]
            assert reminders == [State.CANCELLED.value] * 2
            # Moved: the email about it is of the category the patient left, so it is not sent.
            later = service_appointment("04l000000000002AAA", start + timedelta(days=1), modified=clock.now)
            await world.salesforce(later)
        assert len(paubox.messages) == 1
        [moved] = [r for r in world.rows("salesforce") if r.mapping == "crm-appointment-rescheduled"]
        assert moved.state == State.SKIPPED.value and "opted out of 'appointments' email" in moved.reason
    finally:
        await runtime.aclose()
