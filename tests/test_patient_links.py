"""Patients act on their email: signed links served by `connector run` (in-process through the app the daemon
serves), written back to the FHIR test server, with the Paubox sandbox receiving the email; one-click
unsubscribe; add-to-calendar files read back with the `icalendar` library."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import icalendar
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from connector import calendar, links, optout
from connector.config import load_config
from connector.daemon import run_once, web_app, web_server
from connector.delivery.paubox import PauboxRestMailer
from connector.errors import ConfigError
from connector.models import State
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from connector.sending import actions
from connector.testing import Server, migrated_engine
from connector.web.links import one_click
from tests.conftest import free_port, write_config
from tests.factories import appointment, patient

NOW = datetime.now(UTC).replace(microsecond=0)
PUBLIC = "https://connector.example.org"
LINK_KEY = base64.b64encode(b"link signing key for these tests").decode()
OLD_KEY = base64.b64encode(b"an older link key, still listed!").decode()
MAPPINGS = ("appointment-booked", "appointment-cancelled", "appointment-reminder-48h", "appointment-reminder-2h")
START = NOW + timedelta(hours=47)  # the 48 h reminder is an hour late (within its grace): sent at once
LINK = re.compile(r"https://connector\.example\.org/links/(confirm|cancel|unsubscribe)/[A-Za-z0-9_\-.]+")


class World:
    """The FHIR server, the Paubox sandbox, a clock, and one or more daemons over one ledger."""

    def __init__(
        self,
        tmp_path: Path,
        fhir: FhirState,
        paubox: SandboxState,
        ledger_url: str | None,
        links_extra: str = "",
        server: dict[str, Any] | None = None,
    ) -> None:
        (tmp_path / "link.key").write_text(LINK_KEY)
        (tmp_path / "old.key").write_text(OLD_KEY)
        self.path = write_config(
            tmp_path,
            "http://fhir.test",
            "https://paubox.test",
            mappings=MAPPINGS,
            ledger_url=ledger_url,
            server={"port": 9, "public_url": PUBLIC, **(server or {})},
            extra_source="    write_back: {responses: true, cancel_appointment: true}\n",
            extra="links:\n  keys: {k1: {file: old.key}, k2: {file: link.key}}\n  current: k2\n" + links_extra,
        )
        self.fhir, self.paubox, self.now = fhir, paubox, NOW
        self.runtimes: list[Runtime] = []

    def clock(self) -> datetime:
        return self.now

    def open(self, fhir_transport: httpx.AsyncBaseTransport | None = None) -> Runtime:
        config = load_config(self.path)
        mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(self.paubox)))
        runtime = Runtime.open(
            config,
            self.clock,
            mailer=mailer,
            source_transport=fhir_transport or httpx.ASGITransport(app=fhir_app(self.fhir)),
            exclusive=False,
        )
        self.runtimes.append(runtime)
        return runtime

    def client(self, runtime: Runtime) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=web_app(runtime)), base_url=PUBLIC)

    def links_of(self, subject_part: str) -> dict[str, str]:
        [message] = [m for m in self.paubox.messages if subject_part in m["subject"]]
        return {match.group(1): match.group(0) for match in LINK.finditer(message["text"])}

    def responses(self) -> list[dict[str, Any]]:
        return [self.fhir.current(*key) for key in self.fhir.resources if key[0] == "AppointmentResponse"]  # type: ignore[misc]


def people() -> list[dict[str, Any]]:
    dutch = [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "nl"}]}, "preferred": True}]
    return [
        patient("p1", "Zebulon", email="zebulon.1@example.org"),
        patient("p2", "Quixotica", email="quixotica.2@example.org", communication=dutch),
    ]


@pytest.fixture
def fhir() -> FhirState:
    state = FhirState()
    state.load(people())
    state.put(appointment("a1", "p1", START))
    return state


@pytest.fixture
def paubox() -> SandboxState:
    return SandboxState(api_key="test-sandbox-key", username="clinic")


@pytest.fixture
async def world(tmp_path: Path, fhir: FhirState, paubox: SandboxState, api_key_env: str) -> AsyncIterator[World]:
    made = World(tmp_path, fhir, paubox, None)
    yield made
    for runtime in made.runtimes:
        await runtime.aclose()


async def sent(world: World) -> Runtime:
    runtime = world.open()
    await run_once(runtime)
    return runtime


def states(runtime: Runtime) -> dict[str, tuple[State, str | None]]:
    rows = runtime.ledger.reports.notifications(list(State), 50)
    return {r.mapping: (r.state, r.reason) for r in rows}


async def test_each_email_carries_its_links_the_one_click_headers_and_a_calendar_file(world: World) -> None:
    await sent(world)
    booked = next(m for m in world.paubox.messages if m["subject"].startswith("Your appointment"))
    assert set(world.links_of("Your appointment")) == {"confirm", "cancel", "unsubscribe"}
    unsubscribe = world.links_of("Your appointment")["unsubscribe"]
    assert booked["headers"]["List-Unsubscribe"] == f"<{unsubscribe}>"
    assert booked["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "Zebulon" not in unsubscribe and "a1" not in unsubscribe.split("/")[-1].split(".")[0]
    [ics] = booked["attachments"]
    assert ics["contentType"] == "text/calendar; method=REQUEST"
    calendar = icalendar.Calendar.from_ical(base64.b64decode(ics["content"]))
    [event] = calendar.walk("VEVENT")
    assert calendar["METHOD"] == "REQUEST" and event.decoded("DTSTART") == START
    assert str(event["ORGANIZER"]) == "mailto:appointments@clinic.example.org"
    assert event["ORGANIZER"].params["CN"] == "Example Clinic"
    assert str(event["UID"]).endswith("@clinic.example.org")
    assert "Zebulon" not in base64.b64decode(ics["content"]).decode()


async def test_a_get_never_confirms_cancels_or_unsubscribes(world: World) -> None:
    runtime = await sent(world)
    before = world.fhir.current("Appointment", "a1")
    async with world.client(runtime) as client:
        for action, url in world.links_of("Your appointment").items():
            for _ in range(3):  # a scanner, a previewer, the patient
                page = await client.get(url)
                assert page.status_code == 200 and 'method="post"' in page.text
                assert "Example Clinic" in page.text and "Zebulon" not in page.text, action
                assert page.headers["referrer-policy"] == "no-referrer"
    assert world.responses() == [] and world.fhir.current("Appointment", "a1") == before
    assert runtime.ledger.optouts.entries() == []
    assert states(runtime)["appointment-reminder-2h"][0] is State.PENDING


@pytest.mark.parametrize("form", ["urlencoded", "multipart"])
async def test_one_click_unsubscribes_and_withdraws_later_reminders_of_that_category(world: World, form: str) -> None:
    runtime = await sent(world)
    url = world.links_of("Reminder")["unsubscribe"]
    async with world.client(runtime) as client:
        if form == "urlencoded":
            answer = await client.post(url, data={"List-Unsubscribe": "One-Click"})
        else:
            answer = await client.post(url, files={"List-Unsubscribe": (None, "One-Click")})
    assert answer.status_code == 200 and answer.text == "done"
    [entry] = runtime.ledger.optouts.entries()
    assert (entry.kind, entry.category, entry.origin) == ("email", "reminders", "link")
    state, reason = states(runtime)["appointment-reminder-2h"]
    assert state is State.CANCELLED and reason == "the patient unsubscribed (reminders)"
    world.now = START - timedelta(hours=2)
    sent_before = len(world.paubox.messages)
    await run_once(runtime)
    assert len(world.paubox.messages) == sent_before
    # Essential email still goes: the clinic cancels.
    world.fhir.put({**world.fhir.current("Appointment", "a1"), "status": "cancelled"})  # type: ignore[dict-item]
    await run_once(runtime)
    assert world.paubox.messages[-1]["subject"].endswith("is cancelled")


class Unreachable(httpx.AsyncBaseTransport):
    """An EHR that does not answer."""

    def __init__(self) -> None:
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        raise httpx.ConnectError("connection refused", request=request)


async def test_one_click_works_with_the_ehr_down_and_opts_out_the_address_the_email_went_to(world: World) -> None:
    await sent(world)
    url = world.links_of("Reminder")["unsubscribe"]
    # Since the email, the patient's address changed in the EHR; then the EHR goes down.
    world.fhir.put(patient("p1", "Zebulon", email="zebulon.new@example.org"))
    down = Unreachable()
    runtime = world.open(down)
    async with world.client(runtime) as client:
        answer = await client.post(url, data={"List-Unsubscribe": "One-Click"})
        again = await client.post(url, files={"List-Unsubscribe": (None, "One-Click")})
    assert (answer.status_code, answer.text) == (200, "done") and (again.status_code, again.text) == (200, "done")
    assert down.calls == 0  # the EHR was not asked
    [entry] = runtime.ledger.optouts.entries()
    assert (entry.kind, entry.category, entry.origin, entry.key_id) == ("email", "reminders", "link", "t1")
    assert "zebulon" not in entry.hint + (entry.note or "")
    old, new = runtime.ledger.optouts.matches_many(
        [optout.candidates([], "zebulon.1@example.org"), optout.candidates([], "zebulon.new@example.org")]
    )
    assert old == [entry] and new == []
    state, reason = states(runtime)["appointment-reminder-2h"]
    assert state is State.CANCELLED and reason == "the patient unsubscribed (reminders)"
    # What the ledger keeps for the link is a keyed digest, not the address nor its plain SHA-256.
    [(kind, digest, key_id)] = runtime.ledger.links.recipients(entry_id(runtime, "appointment-reminder-48h"))
    assert (kind, key_id) == ("email", "t1") and digest == entry.digest
    assert digest != optout.digest("email", "zebulon.1@example.org")


async def test_the_daemon_forgets_where_emails_went_once_their_links_have_expired(world: World) -> None:
    runtime = await sent(world)
    booked = entry_id(runtime, "appointment-booked")
    assert runtime.ledger.links.recipients(booked) != []
    world.now = NOW + timedelta(days=59)  # links.ttl is 60 days: still needed
    await run_once(runtime)
    assert runtime.ledger.links.recipients(booked) != []
    world.now = NOW + timedelta(days=61, hours=2)
    await run_once(runtime)
    assert runtime.ledger.links.recipients(booked) == []


async def test_a_ledger_that_fails_answers_503_records_nothing_and_a_retry_works(world: World) -> None:
    runtime = await sent(world)
    url = world.links_of("Reminder")["unsubscribe"]
    with runtime.ledger.engine.begin() as conn:  # the ledger fails (here: the table is not there)
        conn.exec_driver_sql("ALTER TABLE link_recipient RENAME TO link_recipient_away")
    async with world.client(runtime) as client:
        failed = await client.post(url, data={"List-Unsubscribe": "One-Click"})
        with runtime.ledger.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE link_recipient_away RENAME TO link_recipient")
        assert failed.status_code == 503 and "try again later" in failed.text
        assert runtime.ledger.optouts.entries() == []
        assert states(runtime)["appointment-reminder-2h"][0] is State.PENDING
        retried = await client.post(url, data={"List-Unsubscribe": "One-Click"})  # the mailbox provider retries
    assert (retried.status_code, retried.text) == (200, "done")
    assert [e.category for e in runtime.ledger.optouts.entries()] == ["reminders"]
    assert states(runtime)["appointment-reminder-2h"][0] is State.CANCELLED


def entry_id(runtime: Runtime, mapping: str) -> int:
    return next(r.id for r in runtime.ledger.reports.notifications(list(State), 50) if r.mapping == mapping)


async def test_the_page_offers_a_category_or_everything(world: World) -> None:
    runtime = await sent(world)
    url = world.links_of("Your appointment")["unsubscribe"]
    async with world.client(runtime) as client:
        page = await client.get(url)
        assert 'value="category"' in page.text and 'value="all"' in page.text
        answer = await client.post(url, data={"scope": "all"})
    assert answer.status_code == 200 and "You are unsubscribed" in answer.text
    [entry] = runtime.ledger.optouts.entries()
    assert entry.category == "" and entry.origin == "link"
    assert states(runtime)["appointment-reminder-2h"][0] is State.CANCELLED


@pytest.fixture
async def replicas(
    tmp_path: Path, fhir: FhirState, paubox: SandboxState, api_key_env: str, pg_schema_url: str
) -> AsyncIterator[World]:
    with migrated_engine(pg_schema_url):
        pass
    made = World(tmp_path, fhir, paubox, pg_schema_url)
    yield made
    for runtime in made.runtimes:
        await runtime.aclose()


async def test_confirm_writes_one_response_under_double_clicks_and_two_replicas(replicas: World) -> None:
    first = await sent(replicas)
    second = replicas.open()
    url = replicas.links_of("Your appointment")["confirm"]
    before = replicas.fhir.current("Appointment", "a1")
    async with replicas.client(first) as one, replicas.client(second) as two:
        answers = await asyncio.gather(one.post(url), one.post(url), two.post(url), two.post(url))
    assert [a.status_code for a in answers] == [200] * 4
    assert all("your clinic knows you will come" in a.text for a in answers)
    [response] = replicas.responses()
    assert response["participantStatus"] == "accepted"
    assert response["appointment"] == {"reference": "Appointment/a1"}
    assert response["actor"] == {"reference": "Patient/p1"}
    assert replicas.fhir.current("Appointment", "a1") == before  # confirm never changes the Appointment


async def test_cancel_writes_back_and_ends_in_one_cancellation_email_and_no_reminders(world: World) -> None:
    runtime = await sent(world)
    url = world.links_of("Your appointment")["cancel"]
    async with world.client(runtime) as client:
        first, again = await client.post(url), await client.post(url)
    assert first.status_code == again.status_code == 200 and "is cancelled" in again.text
    [response] = world.responses()
    assert response["participantStatus"] == "declined"
    cancelled = world.fhir.current("Appointment", "a1")
    assert cancelled is not None and cancelled["status"] == "cancelled"
    assert cancelled["cancelationReason"]["coding"][0]["code"] == "pat-crs"
    booked_ics = next(m for m in world.paubox.messages if m["subject"].startswith("Your appointment"))
    await run_once(runtime)
    world.now = START - timedelta(hours=1)
    await run_once(runtime)
    cancellations = [m for m in world.paubox.messages if m["subject"].endswith("is cancelled")]
    assert len(cancellations) == 1
    reminders = [m for m in world.paubox.messages if m["subject"].startswith("Reminder")]
    assert len(reminders) == 1  # the 48 h one, sent before the click; the 2 h one never
    assert states(runtime)["appointment-reminder-2h"][0] is State.CANCELLED
    # The calendar entry is the same one, at a higher sequence, now cancelled.
    request = icalendar.Calendar.from_ical(base64.b64decode(booked_ics["attachments"][0]["content"]))
    cancel = icalendar.Calendar.from_ical(base64.b64decode(cancellations[0]["attachments"][0]["content"]))
    [old], [new] = request.walk("VEVENT"), cancel.walk("VEVENT")
    assert cancel["METHOD"] == "CANCEL" and new["STATUS"] == "CANCELLED"
    assert new["UID"] == old["UID"] and new["SEQUENCE"] > old["SEQUENCE"]


async def test_moved_started_or_cancelled_appointments_write_nothing(world: World) -> None:
    runtime = await sent(world)
    found = world.links_of("Your appointment")
    moved = {**world.fhir.current("Appointment", "a1"), "start": (START + timedelta(days=1)).isoformat()}  # type: ignore[dict-item]
    world.fhir.put(moved)
    async with world.client(runtime) as client:
        superseded = await client.post(found["confirm"])
        world.fhir.put({**moved, "status": "cancelled"})
        cancelled = await client.post(found["cancel"])
    assert superseded.status_code == 409 and "moved since this email" in superseded.text
    assert cancelled.status_code == 409 and "was cancelled" in cancelled.text
    assert world.responses() == []


def forged(sign: Callable[[links.LinkKeys], str]) -> str:
    return sign(links.LinkKeys({"k9": b"k" * 32}, "k9"))


async def test_refused_links_get_a_friendly_page_and_a_4xx_and_change_nothing(world: World) -> None:
    runtime = await sent(world)
    found = world.links_of("Your appointment")
    token = found["confirm"].rsplit("/", 1)[1]
    claim = links.Claim(1, "confirm", START, "en", "UTC")
    tampered = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    async with world.client(runtime) as client:
        answers = {
            "tampered": await client.post(f"{PUBLIC}/links/confirm/{tampered}"),
            "other action": await client.post(f"{PUBLIC}/links/cancel/{token}"),
            "retired key": await client.post(f"{PUBLIC}/links/confirm/{forged(lambda k: links.sign(k, claim))}"),
            "malformed": await client.post(f"{PUBLIC}/links/confirm/nonsense"),
        }
        world.now = START + timedelta(minutes=1)
        answers["expired"] = await client.post(found["confirm"])
    assert {reason: a.status_code for reason, a in answers.items()} == {
        "tampered": 403,
        "other action": 403,
        "retired key": 403,
        "malformed": 403,
        "expired": 410,
    }
    assert all("contact your clinic" in a.text for a in answers.values())
    assert world.responses() == []
    assert world.fhir.current("Appointment", "a1")["status"] == "booked"  # type: ignore[index]


def test_tokens_name_their_action_expiry_and_key() -> None:
    keys = links.LinkKeys({"old": b"o" * 32, "new": b"n" * 32}, "new")
    claim = links.Claim(7, "cancel", NOW + timedelta(days=1), "nl", "Europe/Amsterdam")
    token = links.sign(keys, claim)
    assert token.startswith("new.") and links.verify(keys, token, "cancel", NOW) == claim
    older = links.sign(links.LinkKeys(keys.keys, "old"), claim)
    assert links.verify(keys, older, "cancel", NOW) == claim  # rotation: listed keys still verify
    retired = links.LinkKeys({"new": b"n" * 32}, "new")
    cases = [
        (retired, older, "cancel", NOW, "unknown key"),
        (keys, token, "confirm", NOW, "other action"),
        (keys, token, "cancel", claim.expires, "expired"),
        (keys, token.replace("new.", "old."), "cancel", NOW, "tampered"),
        (keys, "new.", "cancel", NOW, "malformed"),
    ]
    for key_set, value, action, now, reason in cases:
        with pytest.raises(links.BadLink) as refused:
            links.verify(key_set, value, action, now)
        assert refused.value.reason == reason


def test_the_email_links_and_headers() -> None:
    keys = links.LinkKeys({"k": b"k" * 32}, "k")
    made = links.for_email(
        keys,
        PUBLIC,
        notification=3,
        actions=["confirm"],
        start=START,
        now=NOW,
        ttl=timedelta(days=60),
        language="en",
        zone="UTC",
        mailto="unsubscribe@clinic.example.org",
    )
    assert set(made.values) == {"confirm_url", "unsubscribe_url"}
    assert made.headers["List-Unsubscribe"] == (
        f"<{made.values['unsubscribe_url']}>, <mailto:unsubscribe@clinic.example.org?subject=unsubscribe>"
    )
    token = made.values["unsubscribe_url"].rsplit("/", 1)[1]
    assert links.verify(keys, token, "unsubscribe", NOW).expires == NOW + timedelta(days=60)


async def test_a_server_that_cannot_create_conditionally_gets_no_write_back(world: World) -> None:
    runtime = await sent(world)
    world.fhir.conditional_create = False  # one write per click could not be promised
    async with world.client(runtime) as client:
        answer = await client.post(world.links_of("Your appointment")["confirm"])
    assert answer.status_code == 403 and "cannot be done online" in answer.text
    assert world.responses() == []


def test_the_sandbox_inbox_shows_the_headers_links_and_calendar_file(
    tmp_path: Path, fhir: FhirState, paubox: SandboxState, api_key_env: str
) -> None:
    world = World(tmp_path, fhir, paubox, None)
    runtime = world.open()
    asyncio.run(run_once(runtime))
    asyncio.run(runtime.aclose())
    number = next(i for i, m in enumerate(paubox.messages, 1) if m["subject"].startswith("Your appointment"))
    with Server(paubox_app(paubox)) as server:
        shown = subprocess.run(
            [sys.executable, "-m", "connector", "sandbox", "inbox", "--url", server.url, "--show", str(number)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "400"},
        )
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^List-Unsubscribe: <https://connector\.example\.org/links/unsubscribe/\S+>$", shown.stdout, re.M)
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in shown.stdout
    assert "Attachment: appointment.ics (text/calendar; method=REQUEST)" in shown.stdout
    assert "Will you come? Confirm: https://connector.example.org/links/confirm/" in shown.stdout


async def test_links_are_logged_and_counted_without_patient_data_or_tokens(world: World) -> None:
    runtime = await sent(world)
    found = world.links_of("Your appointment")
    with structlog.testing.capture_logs() as logs:
        async with world.client(runtime) as client:
            await client.get(found["confirm"])
            await client.post(found["confirm"])
            await client.post(found["unsubscribe"], data={"List-Unsubscribe": "One-Click"})
            await client.post(found["confirm"] + "x")
            metrics = (await client.get("/metrics")).text
    events = {entry["event"] for entry in logs}
    assert {"link.used", "link.unsubscribed", "link.rejected"} <= events
    text = repr(logs)
    tokens = [url.rsplit("/", 1)[1] for url in found.values()]
    for secret in ["Zebulon", "zebulon.1@example.org", *tokens, *(t.split(".")[1] for t in tokens)]:
        assert secret not in text
    assert 'connector_patient_actions_total{action="confirm",outcome="done"} 1.0' in metrics


async def test_the_pages_are_rate_limited(
    tmp_path: Path, fhir: FhirState, paubox: SandboxState, api_key_env: str
) -> None:
    world = World(tmp_path, fhir, paubox, None, links_extra="  rate_limit: 0.001\n  burst: 2\n")
    try:
        runtime = await sent(world)
        url = world.links_of("Your appointment")["confirm"]
        async with world.client(runtime) as client:
            answers = [(await client.get(url)).status_code for _ in range(3)]
            refused = await client.post(url)
            # A valid one-click unsubscribe past the client's limit is still taken (a few times per email).
            unsubscribe = world.links_of("Your appointment")["unsubscribe"]
            clicks = [await client.post(unsubscribe, data={"List-Unsubscribe": "One-Click"}) for _ in range(4)]
            forged = await client.post(unsubscribe + "x", data={"List-Unsubscribe": "One-Click"})
        assert answers == [200, 200, 429] and refused.status_code == 429
        assert world.responses() == []
        assert [c.status_code for c in clicks] == [200, 200, 200, 429] and forged.status_code == 403
        assert [e.origin for e in runtime.ledger.optouts.entries()] == ["link"]
    finally:
        for made in world.runtimes:
            await made.aclose()


@pytest.mark.parametrize("proxied", [True, False])
async def test_the_rate_limit_is_per_client_as_the_trusted_proxies_tell_them_apart(
    tmp_path: Path, fhir: FhirState, paubox: SandboxState, api_key_env: str, proxied: bool
) -> None:
    """Over a real socket, as `connector run` serves: behind a trusted proxy each forwarded client has its own
    bucket; without one, a forged X-Forwarded-For does not buy a fresh bucket."""
    port = free_port()
    server = {"port": port, **({"trusted_proxies": ["127.0.0.1/32"]} if proxied else {})}
    world = World(tmp_path, fhir, paubox, None, links_extra="  rate_limit: 0.001\n  burst: 2\n", server=server)
    runtime = await sent(world)
    http = web_server(runtime)
    assert http is not None
    task = asyncio.create_task(http.serve())
    try:
        while not http.started:
            await asyncio.sleep(0.01)
        path = httpx.URL(world.links_of("Your appointment")["confirm"]).path
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def get(client_address: str) -> int:
                return (await client.get(path, headers={"X-Forwarded-For": client_address})).status_code

            first = [await get("203.0.113.7") for _ in range(2)]
            refused = await client.get(path, headers={"X-Forwarded-For": "203.0.113.7"})
            first.append(refused.status_code)
            others = [await get(a) for a in ("198.51.100.1", "2001:db8::1", "2001:db8::2", "2001:db8::3")]
        assert first == [200, 200, 429]
        assert int(refused.headers["Retry-After"]) >= 1
        # One IPv6 client holds its whole /64.
        assert others == ([200, 200, 200, 429] if proxied else [429, 429, 429, 429])
        assert world.responses() == []
    finally:
        http.should_exit = True
        await task
        for made in world.runtimes:
            await made.aclose()


@given(position=st.integers(min_value=0), replacement=st.sampled_from("ABCDbcZ9_-"))
def test_changing_any_character_of_a_token_refuses_it(position: int, replacement: str) -> None:
    keys = links.LinkKeys({"k": b"k" * 32}, "k")
    token = links.sign(keys, links.Claim(5, "unsubscribe", NOW + timedelta(days=1)))
    index = 2 + position % (len(token) - 2)  # past "k.": the payload or the signature
    changed = token[:index] + replacement + token[index + 1 :]
    if changed == token:
        return
    with pytest.raises(links.BadLink):
        links.verify(keys, changed, "unsubscribe", NOW)


def test_calendar_sequences_grow_with_versions_and_a_deleted_appointment_cancels_above_them() -> None:
    booked = {**appointment("a9", "p1", START), "meta": {"versionId": "1"}}
    moved = {**booked, "start": (START + timedelta(hours=1)).isoformat(), "meta": {"versionId": "2"}}
    remembered = {"resourceType": "Appointment", "id": "a9", "status": "cancelled", "start": booked["start"]}
    files = [
        calendar.invitation(
            resource,
            source="ehr",
            cancelled=cancelled,
            summary="Your appointment",
            organizer="Clinic <appointments@clinic.example.org>",
            zone="Europe/Amsterdam",
            now=NOW,
        )
        for resource, cancelled in ((booked, False), (moved, False), (remembered, True))
    ]
    events = [icalendar.Calendar.from_ical(f.content).walk("VEVENT")[0] for f in files if f is not None]
    assert len({str(e["UID"]) for e in events}) == 1
    assert [e["SEQUENCE"] for e in events] == sorted(e["SEQUENCE"] for e in events)
    assert events[0]["SEQUENCE"] < events[1]["SEQUENCE"] < events[2]["SEQUENCE"]
    assert events[1].decoded("DTSTART") == START + timedelta(hours=1)
    assert [f.content_type for f in files if f] == [
        "text/calendar; method=REQUEST",
        "text/calendar; method=REQUEST",
        "text/calendar; method=CANCEL",
    ]


async def test_cancel_clicked_on_two_replicas_at_once_cancels_once_and_answers_alike(replicas: World) -> None:
    first = await sent(replicas)
    second = replicas.open()
    url = replicas.links_of("Your appointment")["cancel"]
    before = replicas.fhir.current("Appointment", "a1")
    assert before is not None
    async with replicas.client(first) as one, replicas.client(second) as two:
        answers = await asyncio.gather(one.post(url), two.post(url), one.post(url), two.post(url))
    assert [a.status_code for a in answers] == [200] * 4
    [response] = replicas.responses()
    assert response["participantStatus"] == "declined"
    after = replicas.fhir.current("Appointment", "a1")
    assert after is not None and after["status"] == "cancelled"
    # One update won; the other clicks found it cancelled by the patient (after a 412 if they raced it).
    assert int(after["meta"]["versionId"]) == int(before["meta"]["versionId"]) + 1
    updates = [w.status for w in replicas.fhir.writes if w.interaction == "update"]
    assert updates.count(200) == 1 and all(w.if_match for w in replicas.fhir.writes if w.interaction == "update")
    assert set(updates) <= {200, 412}


class ChangedMeanwhile(httpx.AsyncBaseTransport):
    """The FHIR test server, where a clerk edits the appointment just before the connector's first update
    of it arrives: that update names a version that is no longer current."""

    def __init__(self, fhir: FhirState) -> None:
        self.fhir, self.inner, self.edited = fhir, httpx.ASGITransport(app=fhir_app(fhir)), False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and request.url.path.endswith("/Appointment/a1") and not self.edited:
            self.edited = True
            current = self.fhir.current("Appointment", "a1")
            self.fhir.put({**current, "comment": "room 4"})  # type: ignore[dict-item]
        return await self.inner.handle_async_request(request)


async def test_a_cancel_that_meets_a_newer_version_reads_again_and_keeps_the_clinics_change(world: World) -> None:
    await sent(world)
    runtime = world.open(ChangedMeanwhile(world.fhir))
    async with world.client(runtime) as client:
        answer = await client.post(world.links_of("Your appointment")["cancel"])
    assert answer.status_code == 200
    assert [w.status for w in world.fhir.writes if w.interaction == "update"] == [412, 200]
    after = world.fhir.current("Appointment", "a1")
    assert after is not None and after["status"] == "cancelled" and after["comment"] == "room 4"


@pytest.mark.parametrize(
    ("server", "source", "extra", "expected"),
    [
        ({"port": 9}, "", "links-ok", "`links:` needs `server.public_url`"),
        ({"port": 9, "public_url": "http://clinic.example.org"}, "", "", "patients' links need https://"),
        (
            {"port": 9, "public_url": PUBLIC},
            "    write_back: {cancel_appointment: true}\n",
            "",
            "needs write_back.responses",
        ),
        ({"port": 9, "public_url": PUBLIC}, "", "links-bad-current", "links.current names 'k9'"),
    ],
)
def test_link_settings_that_cannot_work_are_refused_with_their_line(
    tmp_path: Path, api_key_env: str, server: dict[str, Any], source: str, extra: str, expected: str
) -> None:
    (tmp_path / "link.key").write_text(LINK_KEY)
    current = "k9" if extra == "links-bad-current" else "k1"
    links_yaml = f"links:\n  keys: {{k1: {{file: link.key}}}}\n  current: {current}\n" if extra else ""
    path = write_config(
        tmp_path, "http://fhir.test", "https://paubox.test", server=server, extra_source=source, extra=links_yaml
    )
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    problems = [str(p) for p in refused.value.problems]
    assert any(expected in p and "config.yaml" in p for p in problems), problems


class Unversioned(httpx.AsyncBaseTransport):
    """The FHIR test server, but its reads of the Appointment carry no version (no ETag, no meta.versionId):
    an update could then only be a blind overwrite."""

    def __init__(self, fhir: FhirState) -> None:
        self.inner = httpx.ASGITransport(app=fhir_app(fhir))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method != "GET" or "/Appointment/" not in request.url.path or response.status_code != 200:
            return response
        body = json.loads(await response.aread())
        body.pop("meta", None)
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in ("etag", "content-length")]
        return httpx.Response(200, headers=headers, content=json.dumps(body).encode())


async def test_a_cancel_never_updates_an_appointment_read_without_a_version(world: World) -> None:
    await sent(world)
    runtime = world.open(Unversioned(world.fhir))
    async with world.client(runtime) as client:
        answer = await client.post(world.links_of("Your appointment")["cancel"])
    assert answer.status_code == 503
    assert [w for w in world.fhir.writes if w.interaction == "update"] == []
    after = world.fhir.current("Appointment", "a1")
    assert after is not None and after["status"] == "booked"
    assert world.responses() == []  # nothing written that the cancel could not finish


async def test_a_cancel_from_a_superseded_email_writes_nothing_once_the_patient_cancelled_the_new_time(
    world: World,
) -> None:
    runtime = await sent(world)
    old = world.links_of("Your appointment")["cancel"]
    # Moved to the next day, and then cancelled by the patient through the newer email's link.
    current = world.fhir.current("Appointment", "a1")
    assert current is not None
    moved = {**current, "start": (START + timedelta(days=1)).isoformat(), "status": "cancelled"}
    world.fhir.put({**moved, "cancelationReason": {"coding": [actions.PAT_CRS]}})
    async with world.client(runtime) as client:
        answer = await client.post(old)
    assert answer.status_code == 409 and "moved since this email" in answer.text
    assert world.responses() == []


async def test_the_calendar_file_names_the_address_it_went_to_as_its_attendee(world: World) -> None:
    await sent(world)
    [message] = [m for m in world.paubox.messages if m["subject"].startswith("Your appointment")]
    ics = icalendar.Calendar.from_ical(base64.b64decode(message["attachments"][0]["content"]))
    [event] = ics.walk("VEVENT")
    assert ics["METHOD"] == "REQUEST"
    assert str(event["ATTENDEE"]) == "mailto:zebulon.1@example.org"  # RFC 5546: a REQUEST names its attendee
    assert "Zebulon" not in ics.to_ical().decode().replace("zebulon.1@", "")


@pytest.mark.parametrize(
    ("part_type", "expected"),
    [
        ("", True),
        ("Content-Type: application/octet-stream\r\n", True),
        ("Content-Type: text/plain; charset=x-no\r\n", True),
    ],
)
def test_a_multipart_one_click_body_is_read_whatever_its_part_says_of_its_type(part_type: str, expected: bool) -> None:
    body = (
        f'--b\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n{part_type}\r\nOne-Click\r\n--b--\r\n'
    ).encode()
    assert one_click("multipart/form-data; boundary=b", body) is expected
    assert one_click("multipart/form-data; boundary=b", body.replace(b"One-Click", b"Other")) is False
