"""The operator console, in-process over a real ledger (SQLite and PostgreSQL): sign-in and its limit,
sessions, CSRF, roles, searches by keyset, actions with their audit entries, SSO from trusted proxies only.
The same flows in a real browser: tests/test_console_browser.py."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher

from connector.config import load_config
from connector.daemon import poll, web_app, web_server
from connector.ledger import SeenVersion
from connector.ledger.console import Search
from connector.models import State, system_clock
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.testing import Process, Server, appointment, connector_argv, free_port, patient, sqlite_url
from tests.console_harness import OPERATOR, VIEWER, Seeded, console_app, csrf_of, seed, write_console_config

SSO = "  sso:\n    user_header: X-Remote-User\n    operators: [sso-olivia]\n"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return sqlite_url(tmp_path / "ledger.db") if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")


class Site:
    def __init__(self, folder: Path, url: str, **options: Any) -> None:
        self.app, self.ledger = console_app(write_console_config(folder, url, **options))
        self.seeded: Seeded = seed(self.ledger.engine)

    @asynccontextmanager
    async def client(self, address: str = "127.0.0.1", scheme: str = "http") -> AsyncIterator[httpx.AsyncClient]:
        transport = httpx.ASGITransport(app=self.app, client=(address, 50000))
        async with httpx.AsyncClient(transport=transport, base_url=f"{scheme}://console.test") as client:
            yield client

    @asynccontextmanager
    async def signed_in(self, who: tuple[str, str]) -> AsyncIterator[httpx.AsyncClient]:
        async with self.client() as client:
            page = await client.get("/console/login")
            answer = await client.post(
                "/console/login", data={"user": who[0], "password": who[1], "csrf": csrf_of(page.text)}
            )
            assert answer.status_code == 303, answer.text
            yield client

    def state(self, nid: int) -> State:
        detail = self.ledger.console.detail(nid)
        assert detail is not None
        return detail.record.state


@pytest.fixture
def site(tmp_path: Path, url: str) -> Iterator[Site]:
    made = Site(tmp_path, url)
    yield made
    made.ledger.dispose()


async def test_without_a_session_every_page_redirects_to_sign_in(site: Site) -> None:
    async with site.client() as client:
        for path in (
            "/console",
            "/console/notifications?state=failed",
            f"/console/notifications/{site.seeded.sent}",
            "/console/appointments/appt-sent",
            "/console/audit",
        ):
            answer = await client.get(path)
            assert (answer.status_code, answer.headers["location"]) == (303, "/console/login"), path
        answer = await client.post(f"/console/notifications/{site.seeded.in_doubt}/act", data={"action": "retry"})
        assert answer.status_code == 401
    assert site.state(site.seeded.in_doubt) is State.IN_DOUBT


async def test_failed_sign_ins_are_limited_per_user_and_address(site: Site) -> None:
    async with site.client() as client:
        token = csrf_of((await client.get("/console/login")).text)
        for _ in range(5):
            answer = await client.post("/console/login", data={"user": OPERATOR[0], "password": "wrong", "csrf": token})
            assert answer.status_code == 401 and "unknown user or wrong password" in answer.text
        answer = await client.post("/console/login", data={"user": OPERATOR[0], "password": OPERATOR[1], "csrf": token})
        assert answer.status_code == 401 and "too many failed sign-ins" in answer.text
        answer = await client.post("/console/login", data={"user": VIEWER[0], "password": VIEWER[1], "csrf": token})
        assert answer.status_code == 303  # another user from the same address is not locked out
        forged = await client.post("/console/login", data={"user": VIEWER[0], "password": VIEWER[1]})
        assert forged.status_code == 403  # the sign-in form carries its own token too


async def test_a_sign_in_form_token_signs_in_only_the_browser_it_was_given_to(site: Site) -> None:
    """Login CSRF: an attacker takes a sign-in form (token and pre-session cookie) in their own browser and
    makes a victim's browser post it with the attacker's credentials. The victim's browser lacks the
    attacker's pre-session cookie (or has its own), so it is not signed into the attacker's account."""
    async with site.client() as attacker:
        token = csrf_of((await attacker.get("/console/login")).text)
    credentials = {"user": VIEWER[0], "password": VIEWER[1], "csrf": token}
    async with site.client() as victim:  # never opened the console: no pre-session cookie at all
        forged = await victim.post("/console/login", data=credentials)
        assert forged.status_code == 403 and "connector_console" not in forged.cookies
        assert "from another browser" in forged.text
    async with site.client() as victim:  # had the sign-in page open: a pre-session cookie of its own
        own = csrf_of((await victim.get("/console/login")).text)
        forged = await victim.post("/console/login", data=credentials)
        assert forged.status_code == 403 and "connector_console" not in forged.cookies
        assert (await victim.get("/console")).status_code == 303  # not signed in
        answer = await victim.post("/console/login", data={**credentials, "csrf": own})
        assert answer.status_code == 303  # its own form's token works
        assert (await victim.get("/console")).status_code == 200


async def test_a_form_too_large_or_with_too_many_fields_is_refused_not_a_crash(site: Site) -> None:
    """A posted form over 64 KiB or 40 fields gets a 400 that says so, on the sign-in page and once signed
    in (it was an unexpected error: a 500)."""
    async with site.signed_in(OPERATOR) as client:
        token = csrf_of((await client.get("/console/notifications")).text)
        many = {"csrf": token, **{f"field{i}": "x" for i in range(45)}}
        for path in ("/console/login", "/console/notifications", "/console/notifications/act", "/console/replay"):
            answer = await client.post(path, data=many)
            assert (answer.status_code, "more than 40 fields" in answer.text) == (400, True), path
            large = await client.post(path, data={"csrf": token, "reason": "x" * 70_000})
            assert (large.status_code, "larger than 64 KiB" in large.text) == (400, True), path


async def test_session_cookie_is_signed_http_only_secure_and_strict(tmp_path: Path) -> None:
    site = Site(tmp_path, sqlite_url(tmp_path / "ledger.db"), secure_cookie=True)
    try:
        async with site.client(scheme="https") as client:  # a Secure cookie goes back over https only
            form = await client.get("/console/login")
            token = csrf_of(form.text)
            answer = await client.post(
                "/console/login", data={"user": OPERATOR[0], "password": OPERATOR[1], "csrf": token}
            )
        (before,) = form.headers.get_list("set-cookie")  # the pre-session cookie the form's token is bound to
        assert before.startswith("connector_console_login=")
        before = before.lower()
        assert all(flag in before for flag in ("httponly", "secure", "samesite=strict", "path=/console/login"))
        session, dropped = sorted(answer.headers.get_list("set-cookie"))
        assert session.startswith("connector_console=") and dropped.startswith("connector_console_login=")
        cookie = session.lower()
        assert all(flag in cookie for flag in ("httponly", "secure", "samesite=strict", "path=/console"))
        assert OPERATOR[1] not in cookie
        assert "max-age=0" in dropped.lower()  # the pre-session cookie is spent by the sign-in
        async with site.client() as client:  # a tampered cookie is no session
            value = answer.cookies["connector_console"]
            client.cookies.set("connector_console", value[:-2] + ("AA" if not value.endswith("AA") else "BB"))
            assert (await client.get("/console")).status_code == 303
    finally:
        site.ledger.dispose()


async def test_search_by_appointment_and_pages_by_keyset_newest_first(site: Site) -> None:
    async with site.signed_in(VIEWER) as client:
        token = csrf_of((await client.get("/console/notifications")).text)
        found = await client.post("/console/notifications", data={"csrf": token, "appointment_id": "appt-doubt"})
        assert f'/console/notifications/{site.seeded.in_doubt}"' in found.text
        assert found.text.count('class="open"') == 1
        first = await client.post("/console/notifications", data={"csrf": token})
        ids = [int(x) for x in _ids(first.text)]
        assert len(ids) == 10 and ids == sorted(ids, reverse=True)
        before = first.text.split('name="before" value="')[1].split('"')[0]
        second = [
            int(x)
            for x in _ids((await client.post("/console/notifications", data={"csrf": token, "before": before})).text)
        ]
        assert len(second) == 10 and max(second) < min(ids)
        by_link = await client.get("/console/notifications", params={"state": "failed"})  # the overview's links
        assert _ids(by_link.text) == [str(site.seeded.failed)]
        bad = await client.post("/console/notifications", data={"csrf": token, "state": "lost", "since": "tuesday"})
        assert bad.status_code == 400 and "state: one of" in bad.text
        forged = await client.post("/console/notifications", data={"patient_id": "pat-appt-doubt"})
        assert forged.status_code == 403


async def test_a_get_search_refuses_patient_ids_and_keys_in_the_address(site: Site) -> None:
    """Patient ids and keys are posted, never taken from a query string (URLs land in history and logs)."""
    async with site.signed_in(VIEWER) as client:
        for field, value in (("patient_id", "pat-appt-doubt"), ("key", "anything")):
            answer = await client.get("/console/notifications", params={field: value})
            assert answer.status_code == 400 and "search with the form" in answer.text, field
            assert value not in answer.text and 'class="open"' not in answer.text
        by_state = await client.get("/console/notifications", params={"state": "failed"})
        assert by_state.status_code == 200 and _ids(by_state.text) == [str(site.seeded.failed)]


async def test_an_operator_resolves_an_in_doubt_notification_and_the_audit_shows_it(site: Site) -> None:
    nid = site.seeded.in_doubt
    async with site.signed_in(OPERATOR) as client:
        page = await client.get(f"/console/notifications/{nid}")
        assert 'id="act"' in page.text and "resolve-sent" in page.text
        answer = await client.post(
            f"/console/notifications/{nid}/act",
            data={"csrf": csrf_of(page.text), "action": "resolve-sent", "reason": "Paubox support confirmed it left"},
        )
        assert answer.status_code == 303
        assert site.state(nid) is State.SENT
        timeline = (await client.get(f"/console/notifications/{nid}")).text
        assert "resolve-sent" in timeline and "Paubox support confirmed it left" in timeline and OPERATOR[0] in timeline
        audit = (await client.get("/console/audit")).text
        assert "resolve-sent" in audit and OPERATOR[0] in audit
        again = await client.post(
            f"/console/notifications/{nid}/act",
            data={"csrf": csrf_of(page.text), "action": "resolve-cancel", "reason": "changed my mind"},
        )
        assert again.status_code == 303 and site.state(nid) is State.SENT  # no longer in doubt: nothing changes
        no_reason = await client.post(
            f"/console/notifications/{site.seeded.failed}/act",
            data={"csrf": csrf_of(page.text), "action": "retry", "reason": " "},
        )
        assert no_reason.status_code == 400 and site.state(site.seeded.failed) is State.FAILED


async def test_a_post_without_the_sessions_csrf_token_is_refused(site: Site) -> None:
    nid = site.seeded.in_doubt
    async with site.signed_in(OPERATOR) as client:
        for data in ({}, {"csrf": "forged-token"}):
            answer = await client.post(
                f"/console/notifications/{nid}/act", data={**data, "action": "resolve-cancel", "reason": "forged"}
            )
            assert answer.status_code == 403 and "CSRF" in answer.text
        assert (await client.post("/console/logout")).status_code == 403
    assert site.state(nid) is State.IN_DOUBT
    assert site.ledger.console.audit_log(None, 10) == []


async def test_a_viewer_sees_but_cannot_act(site: Site) -> None:
    nid = site.seeded.failed
    async with site.signed_in(VIEWER) as client:
        page = await client.get(f"/console/notifications/{nid}")
        assert 'id="act"' not in page.text and 'id="viewer-note"' in page.text
        answer = await client.post(
            f"/console/notifications/{nid}/act", data={"csrf": csrf_of(page.text), "action": "retry", "reason": "try"}
        )
        assert answer.status_code == 403 and "viewers cannot act" in answer.text
    assert site.state(nid) is State.FAILED


async def test_an_operator_retries_every_failed_one_a_search_finds(site: Site) -> None:
    async with site.signed_in(OPERATOR) as client:
        page = await client.get("/console/notifications", params={"state": "failed"})
        assert 'id="bulk"' in page.text
        answer = await client.post(
            "/console/notifications/act",
            data={"csrf": csrf_of(page.text), "state": "failed", "action": "retry", "reason": "Paubox outage is over"},
        )
        assert answer.status_code == 200 and "1 notification(s) changed" in answer.text
    assert site.state(site.seeded.failed) is State.PENDING
    entries = site.ledger.console.audit_log(None, 10)
    summary = next(e for e in entries if e.notification_id is None)
    assert (summary.action, summary.count, summary.scope) == ("retry", 1, "state=failed")
    assert any(e.notification_id == site.seeded.failed for e in entries)  # shown in its timeline


async def test_overview_and_appointment_pages(site: Site) -> None:
    site.ledger.intake.record_page(
        "ehr", [], [SeenVersion("Appointment", "appt-bad", "7", None, "participant is not a list")], None
    )
    async with site.signed_in(VIEWER) as client:
        overview = (await client.get("/console")).text
        assert "<svg" in overview and "notifications per day, last 30 days" in overview
        assert f'href="/console/notifications/{site.seeded.in_doubt}"' in overview  # the attention list
        assert "participant is not a list" in overview and "Appointment/appt-bad" in overview  # quarantined
        story = (await client.get("/console/appointments/appt-sent")).text
        assert "trk-0001" not in story and f"/console/notifications/{site.seeded.sent}" in story
        detail = (await client.get(f"/console/notifications/{site.seeded.sent}")).text
        assert "trk-0001" in detail and "delivery status delivered" in detail


@pytest.mark.parametrize(("address", "signed_in"), [("10.1.2.3", True), ("10.9.9.9", False)])
async def test_a_single_sign_on_header_is_believed_only_from_a_trusted_proxy(
    tmp_path: Path, address: str, signed_in: bool
) -> None:
    site = Site(tmp_path, sqlite_url(tmp_path / "ledger.db"), sso=SSO, trusted=["10.1.2.3/32"])
    try:
        async with site.client(address) as client:
            page = await client.get(
                f"/console/notifications/{site.seeded.in_doubt}", headers={"X-Remote-User": "sso-olivia"}
            )
            assert (page.status_code == 200) is signed_in
            if signed_in:
                assert "sso-olivia · operator" in page.text
                answer = await client.post(
                    f"/console/notifications/{site.seeded.in_doubt}/act",
                    headers={"X-Remote-User": "sso-olivia"},
                    data={"csrf": csrf_of(page.text), "action": "resolve-cancel", "reason": "duplicate booking"},
                )
                assert answer.status_code == 303 and site.state(site.seeded.in_doubt) is State.CANCELLED
    finally:
        site.ledger.dispose()


def test_search_filters_describe_themselves_without_ids() -> None:
    search = Search(appointment_id="a1", patient_id="p1", state=State.FAILED, mapping="m")
    assert search.describe() == "appointment_id given, patient_id given, mapping=m, state=failed"


def test_add_user_writes_an_argon2_hash_and_prints_the_config_lines(tmp_path: Path) -> None:
    target = tmp_path / "olivia.hash"

    def add_user(*args: str, password: str) -> subprocess.CompletedProcess[str]:
        argv = connector_argv("console", "add-user", *args, "--password-stdin")
        return subprocess.run(argv, input=password + "\n", capture_output=True, text=True, timeout=60, check=False)

    result = add_user("olivia", "--role", "operator", "--hash-file", str(target), password="a-long-enough-password")
    assert result.returncode == 0, result.stderr
    assert PasswordHasher().verify(target.read_text().strip(), "a-long-enough-password")
    assert target.stat().st_mode & 0o777 == 0o600
    assert "olivia: {role: operator, password_hash: {file:" in result.stdout
    short = add_user("x", "--hash-file", str(tmp_path / "x"), password="short")
    assert short.returncode == 2 and "at least 12 characters" in short.stderr
    assert not (tmp_path / "x").exists()


def _ids(html: str) -> list[str]:
    return [part.split("<")[0] for part in html.split('class="open">')[1:]]


@pytest.mark.parametrize(("trusted", "believed"), [("127.0.0.1/32", True), ("10.0.0.0/8", False)])
async def test_connector_run_serves_the_console_and_believes_sso_only_from_its_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trusted: str, believed: bool
) -> None:
    """Over a real socket, as the daemon serves it: the proxy's X-Forwarded-For replaces the client address,
    yet the header is judged by the immediate peer (127.0.0.1 here)."""
    monkeypatch.setenv("PAUBOX_API_KEY", "test-sandbox-key")
    port = free_port()
    path = write_console_config(tmp_path, sqlite_url(tmp_path / "ledger.db"), port=port, sso=SSO, trusted=[trusted])
    runtime = Runtime.open(load_config(path), system_clock)
    server = web_server(runtime)
    assert server is not None
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            headers = {"X-Remote-User": "sso-olivia", "X-Forwarded-For": "203.0.113.9"}
            page = await client.get("/console", headers=headers)
        if believed:
            assert page.status_code == 200 and "sso-olivia · operator" in page.text
        else:
            assert (page.status_code, page.headers["location"]) == (303, "/console/login")
    finally:
        server.should_exit = True
        await task
        await runtime.aclose()


async def test_an_operator_previews_the_email_as_it_would_be_sent_now_and_the_preview_is_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fhir_server: Server, fhir_state: FhirState
) -> None:
    monkeypatch.setenv("PAUBOX_API_KEY", "test-sandbox-key")
    start = datetime.now(UTC) + timedelta(days=3)
    fhir_state.load([patient("p1", "Ada", email="ada@example.org"), appointment("a1", "p1", start)])
    path = write_console_config(tmp_path, sqlite_url(tmp_path / "ledger.db"), fhir_url=fhir_server.url)
    runtime = Runtime.open(load_config(path), system_clock)
    try:
        await poll(runtime, "ehr")
        found = runtime.ledger.console.search(Search(appointment_id="a1"), None, 10)
        assert found, "the poll planned nothing"
        nid = found[-1].id
        transport = httpx.ASGITransport(app=web_app(runtime), client=("127.0.0.1", 50000))
        for who, allowed in ((OPERATOR, True), (VIEWER, False)):
            async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as client:
                token = csrf_of((await client.get("/console/login")).text)
                await client.post("/console/login", data={"user": who[0], "password": who[1], "csrf": token})
                page = await client.get(f"/console/notifications/{nid}")
                assert ('id="preview-form"' in page.text) is allowed
                shown = await client.post(f"/console/notifications/{nid}/preview", data={"csrf": csrf_of(page.text)})
            if allowed:
                assert shown.status_code == 200 and "ada@example.org" in shown.text and 'id="subject"' in shown.text
            else:
                assert shown.status_code == 403 and "ada@example.org" not in shown.text
        entries = runtime.ledger.console.audit_log(None, 10)
        assert [(e.action, e.actor, e.notification_id) for e in entries] == [("preview", OPERATOR[0], nid)]
        assert "ada" not in repr(entries).lower()  # the audit holds no patient data
        assert runtime.ledger.console.detail(nid).record.state is State.PENDING  # type: ignore[union-attr]
    finally:
        await runtime.aclose()


async def test_an_operator_replays_a_window_dry_first_then_for_real_and_the_ledger_suppresses_repeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fhir_server: Server, fhir_state: FhirState
) -> None:
    monkeypatch.setenv("PAUBOX_API_KEY", "test-sandbox-key")
    start = datetime.now(UTC) + timedelta(days=3)
    fhir_state.load([patient("p1", "Ada", email="ada@example.org"), appointment("a1", "p1", start)])
    path = write_console_config(tmp_path, sqlite_url(tmp_path / "ledger.db"), fhir_url=fhir_server.url)
    runtime = Runtime.open(load_config(path), system_clock)
    try:
        transport = httpx.ASGITransport(app=web_app(runtime), client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as client:
            token = csrf_of((await client.get("/console/login")).text)
            await client.post("/console/login", data={"user": OPERATOR[0], "password": OPERATOR[1], "csrf": token})
            form = {"csrf": csrf_of((await client.get("/console/replay")).text), "source": "ehr", "since": "2000-01-01"}
            dry = await client.post("/console/replay", data=form)
            assert dry.status_code == 200 and "would be planned" in dry.text and 'id="confirm-form"' in dry.text
            assert runtime.ledger.console.search(Search(), None, 10) == []  # a dry run records nothing
            unexplained = await client.post("/console/replay", data={**form, "confirm": "yes", "reason": ""})
            assert unexplained.status_code == 400 and runtime.ledger.console.search(Search(), None, 10) == []
            real = await client.post(
                "/console/replay", data={**form, "confirm": "yes", "reason": "EHR outage on 1 Dec"}
            )
            assert real.status_code == 200 and "new notification(s) recorded" in real.text
            planned = runtime.ledger.console.search(Search(appointment_id="a1"), None, 10)
            assert planned
            again = await client.post("/console/replay", data=form)
            assert "suppressed: already in the ledger" in again.text and 'id="confirm-form"' not in again.text
        entries = runtime.ledger.console.audit_log(None, 10)
        assert [(e.action, e.reason) for e in entries] == [("replay", "EHR outage on 1 Dec")]
        assert entries[0].scope is not None and entries[0].scope.startswith("source=ehr, since=2000-01-01")
    finally:
        await runtime.aclose()


@pytest.mark.slow
def test_connector_console_serve_runs_the_console_alone(tmp_path: Path) -> None:
    """`connector console serve` as a real process over the ledger a daemon would share: sign in, find one."""
    port = free_port()
    path = write_console_config(tmp_path, sqlite_url(tmp_path / "ledger.db"), port=port)
    _, ledger = console_app(path)  # creates the schema; seed as a daemon would have written
    seeded = seed(ledger.engine)
    ledger.dispose()
    argv = connector_argv("console", "serve", "--config", str(path))
    with Process(argv, tmp_path / "console.log", name="connector console serve") as child:
        child.wait_http(f"http://127.0.0.1:{port}/console/login")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/").headers["location"] == "/console"
            token = csrf_of(client.get("/console/login").text)
            client.post("/console/login", data={"user": VIEWER[0], "password": VIEWER[1], "csrf": token})
            page = client.get("/console/notifications", params={"appointment_id": "appt-failed"})
            assert f"/console/notifications/{seeded.failed}" in page.text
            replay = client.get("/console/replay")
            assert "open the console served by <code>connector run</code>" in replay.text
    assert "Traceback" not in child.log_text()
    missing = subprocess.run(
        connector_argv("console", "serve", "--config", str(tmp_path / "nope.yaml")),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert missing.returncode == 2 and "does not exist" in missing.stderr
