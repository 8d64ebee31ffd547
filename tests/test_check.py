"""`connector check`: the preflight against the real sandboxes, a real ledger (SQLite and PostgreSQL), an
aiosmtpd relay with STARTTLS and AUTH, and servers that are down; and the pure verdicts behind its lines."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP as SmtpServer
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from connector import preflight
from connector.commands.check import guarded, run
from connector.preflight import Check
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.smart_token import SmartTokenState
from connector.sandbox.smart_token import create_app as token_app
from connector.testing import API_KEY, Server, cli, environment, free_port, serve_fhir, serve_paubox, write_config

SMTP_PASSWORD = "smtp-test-key-0b1c"


def by_name(checks: list[Check]) -> dict[tuple[str, str], Check]:
    return {(c.part, c.name): c for c in checks}


def upgraded(config: Path) -> Path:
    cli("db", "upgrade", "--config", config, cwd=config.parent)
    return config


def test_everything_passes_against_the_sandboxes_and_exit_is_0(tmp_path: Path) -> None:
    with serve_fhir(FhirState()) as fhir, serve_paubox() as paubox:
        config = upgraded(write_config(tmp_path, fhir.url, paubox.url))
        env = environment(PAUBOX_API_KEY=API_KEY, COLUMNS="60")  # a narrow "terminal": lines are still not wrapped
        result = cli("check", "--config", config, cwd=tmp_path, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 + 3 + 4 + 2 + 1  # config, ledger, source, paubox, the tally
    assert all(line.startswith("✓ ") for line in lines[:-1]), result.stdout
    for expected in (
        "✓ ledger: writable:",
        "✓ source ehr: CapabilityStatement: read (FHIR 4.0.1)",
        "✓ source ehr: one-page probe:",
        "✓ paubox: API key: accepted",
        "✓ paubox: sender domain: clinic.example.org",
    ):
        assert any(line.startswith(expected) for line in lines), (expected, result.stdout)
    assert lines[-1] == f"all {len(lines) - 1} checks passed"
    assert "\x1b[" not in result.stdout  # not a terminal: no colour codes


def test_a_wrong_key_fails_the_paubox_check_and_json_has_its_shape(tmp_path: Path) -> None:
    with serve_fhir(FhirState()) as fhir, serve_paubox() as paubox:
        config = upgraded(write_config(tmp_path, fhir.url, paubox.url))
        result = cli(
            "check",
            "--config",
            config,
            "--json",
            cwd=tmp_path,
            env=environment(PAUBOX_API_KEY="not-the-key-7d2e"),
            check=False,
        )
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert set(data) == {"ok", "checks"} and data["ok"] is False
    for item in data["checks"]:
        assert set(item) == {"part", "name", "ok", "detail", "fix"}
        assert isinstance(item["ok"], bool) and isinstance(item["detail"], str)
    failed = [c for c in data["checks"] if not c["ok"]]
    assert [(c["part"], c["name"]) for c in failed] == [("paubox", "API key")]
    assert failed[0]["detail"] == "refused (HTTP 401)" and "delivery.paubox.api_key" in failed[0]["fix"]
    assert "not-the-key-7d2e" not in result.stdout  # the key itself is never printed


def test_a_wrong_base_url_is_told_from_a_wrong_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sandbox, like Paubox's gateway, answers an unrouted path with an HTML 404."""
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    with serve_fhir(FhirState()) as fhir, serve_paubox() as paubox:
        config = write_config(tmp_path, fhir.url, paubox.url, paubox={"base_url": f"{paubox.url}/v2/nowhere"})
        checks = by_name(asyncio.run(run(config)))
    key = checks[("paubox", "API key")]
    assert not key.ok and "404 without Paubox's JSON" in key.detail and "base_url" in (key.fix or "")


def test_a_fhir_server_that_is_down_fails_reachable_and_what_depends_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    down = f"http://127.0.0.1:{free_port()}"
    with serve_paubox() as paubox:
        config = write_config(tmp_path, down, paubox.url)
        checks = asyncio.run(run(config))
    source = [c for c in checks if c.part == "source ehr"]
    assert [(c.name, c.ok) for c in source] == [
        ("reachable", False),
        ("CapabilityStatement", False),
        ("strategy last-updated declared", False),
        ("one-page probe", False),
    ]
    assert "ConnectError" in source[0].detail and "base_url" in (source[0].fix or "")
    assert source[1].detail.startswith("not checked")
    assert by_name(checks)[("paubox", "API key")].ok  # the other parts are still checked


def test_a_ledger_database_that_is_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    closed = f"postgresql+psycopg://postgres:secret-pw@127.0.0.1:{free_port()}/test"
    with serve_fhir(FhirState()) as fhir, serve_paubox() as paubox:
        config = write_config(tmp_path, fhir.url, paubox.url, ledger_url=closed)
        checks = asyncio.run(run(config))
    ledger = [c for c in checks if c.part == "ledger"]
    assert [(c.name, c.ok) for c in ledger] == [("reachable", False), ("migrated", False), ("writable", False)]
    assert "OperationalError" in ledger[0].detail and "database is running" in (ledger[0].fix or "")
    assert "secret-pw" not in ledger[0].detail  # the password is masked
    assert not preflight.passed(checks)


@pytest.mark.postgres
def test_a_postgresql_ledger_not_migrated_then_migrated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_schema_url: str
) -> None:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    with serve_fhir(FhirState()) as fhir, serve_paubox() as paubox:
        config = write_config(tmp_path, fhir.url, paubox.url, ledger_url=pg_schema_url)
        before = by_name(asyncio.run(run(config)))
        upgraded(config)
        after = by_name(asyncio.run(run(config)))
    assert before[("ledger", "reachable")].ok
    migrated = before[("ledger", "migrated")]
    assert not migrated.ok and migrated.fix == "run `connector db upgrade`"
    assert not before[("ledger", "writable")].ok
    assert after[("ledger", "migrated")].ok and after[("ledger", "writable")].ok
    assert all(c.ok for c in after.values()), [c for c in after.values() if not c.ok]


def test_a_sqlite_ledger_that_does_not_exist_is_not_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    with serve_fhir(FhirState()) as fhir, serve_paubox() as paubox:
        config = write_config(tmp_path, fhir.url, paubox.url)
        reachable = by_name(asyncio.run(run(config)))[("ledger", "reachable")]
    assert not reachable.ok and "connector db upgrade" in (reachable.fix or "")
    assert not (tmp_path / "connector.db").exists()


def test_a_server_that_ignores_last_updated_fails_the_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vendor-like mode of the FHIR test server ignores `_lastUpdated`: a last-updated poll would read
    everything every time. The one-page probe sees it in the self link."""
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    with serve_fhir(FhirState(mode="epic")) as fhir, serve_paubox() as paubox:
        config = write_config(tmp_path, fhir.url, paubox.url)
        checks = by_name(asyncio.run(run(config)))
        window = write_config(tmp_path, fhir.url, paubox.url, source={"strategy": "date-window"}, name="window.yaml")
        windowed = by_name(asyncio.run(run(window)))
    probe = checks[("source ehr", "one-page probe")]
    assert not probe.ok and "ignored _lastUpdated" in probe.detail and "strategy" in (probe.fix or "")
    assert windowed[("source ehr", "one-page probe")].ok, windowed[("source ehr", "one-page probe")]


def notify_app() -> Starlette:
    async def notify(request: Request) -> Response:
        return Response(status_code=202)

    return Starlette(routes=[Route("/fhir/ehr/notify", notify, methods=["POST"])])


def test_webhook_public_urls_answer_or_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    monkeypatch.setenv("SUB_SECRET", "Bearer sub-secret-1")
    with serve_fhir(FhirState()) as fhir, serve_paubox() as paubox, Server(notify_app()) as endpoint:
        results = {}
        for path in ("/fhir/ehr/notify", "/elsewhere"):
            subscription = {"enabled": True, "secret": "${SUB_SECRET}", "endpoint": endpoint.url + path}
            config = write_config(
                tmp_path, fhir.url, paubox.url, source={"subscription": subscription}, name=f"c{len(results)}.yaml"
            )
            results[path] = by_name(asyncio.run(run(config)))[("webhook ehr (subscription)", "public URL")]
        down = write_config(
            tmp_path,
            fhir.url,
            paubox.url,
            source={"subscription": {**subscription, "endpoint": f"http://127.0.0.1:{free_port()}/fhir/ehr/notify"}},
            name="down.yaml",
        )
        unreachable = by_name(asyncio.run(run(down)))[("webhook ehr (subscription)", "public URL")]
    assert results["/fhir/ehr/notify"].ok and "405" in results["/fhir/ehr/notify"].detail
    assert not results["/elsewhere"].ok and "404" in results["/elsewhere"].detail
    assert not unreachable.ok and "ConnectError" in unreachable.detail


# -- the SMTP relay ----------------------------------------------------------------------------------------


class Relay:
    def __init__(self) -> None:
        self.quits = 0
        self.logins: list[bytes] = []

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        self.logins.append(auth_data.login)
        ok = auth_data.login == b"apikey" and auth_data.password == SMTP_PASSWORD.encode()
        return AuthResult(success=ok, handled=False)

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.quits += 1
        return "221 Bye"


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[tuple[int, Relay]]:
    """aiosmtpd on 127.0.0.1 demanding STARTTLS, then AUTH; its CA written to tmp_path/ca.pem."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    handler = Relay()
    loop = asyncio.get_running_loop()

    def factory() -> SmtpServer:
        return SmtpServer(
            handler,
            tls_context=context,
            require_starttls=True,
            auth_required=True,
            authenticator=handler.authenticate,
            hostname="smtp.test",
            loop=loop,
        )

    server = await loop.create_server(factory, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1]), handler
    server.close()
    await server.wait_closed()


def smtp_config(folder: Path, fhir: str, paubox: str, port: int) -> Path:
    smtp = (
        f"  transport: paubox-smtp\n  smtp:\n    host: 127.0.0.1\n    port: {port}\n    ca_file: ca.pem\n"
        "    timeout: 5s\n"
    )
    return write_config(folder, fhir, paubox, delivery_extra=smtp, paubox={"base_url": None})


async def test_smtp_relay_connect_starttls_auth_quit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relay: tuple[int, Relay]
) -> None:
    port, handler = relay
    with serve_fhir(FhirState()) as fhir, serve_paubox() as paubox:
        config = smtp_config(tmp_path, fhir.url, paubox.url, port)
        monkeypatch.setenv("PAUBOX_API_KEY", SMTP_PASSWORD)
        good = by_name(await run(config))
        monkeypatch.setenv("PAUBOX_API_KEY", "not-the-key")
        bad = by_name(await run(config))
    check = good[("smtp", "connect, STARTTLS, AUTH, QUIT")]
    assert check.ok and check.detail == f"127.0.0.1:{port}"
    assert handler.quits == 1 and set(handler.logins) == {b"apikey"}  # the bad key: one try per mechanism
    refused = bad[("smtp", "connect, STARTTLS, AUTH, QUIT")]
    assert not refused.ok and "535" in refused.detail and "authentication failed" in refused.detail
    assert ("paubox", "API key") not in good  # no REST endpoint configured: only the relay is checked


# -- the pure verdicts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "is_json", "ok", "words"),
    [
        (404, True, True, "accepted"),
        (200, True, True, "accepted"),
        (401, True, False, "refused (HTTP 401)"),
        (403, False, False, "refused (HTTP 403)"),
        (404, False, False, "without Paubox's JSON"),
        (503, False, False, "HTTP 503"),
        (400, True, False, "unexpected HTTP 400"),
    ],
)
def test_paubox_key_verdicts(status: int, is_json: bool, ok: bool, words: str) -> None:
    check = preflight.paubox_key(status, is_json)
    assert check.ok is ok and words in check.detail
    assert (check.fix is None) is ok


@pytest.mark.parametrize(
    ("sender", "reply_to", "ok", "words"),
    [
        ("Clinic <appointments@clinic.example.org>", None, True, "clinic.example.org (a reserved example domain"),
        ("appointments@hospital.example", "desk@hospital.example", True, "hospital.example;"),
        ("appointments@hospital.example", "desk@other.example", False, "reply_to is not on hospital.example"),
        ("Clinic", None, False, "no address with a domain"),
        ("root@localhost", None, False, "no address with a domain"),
    ],
)
def test_sender_domain_verdicts(sender: str, reply_to: str | None, ok: bool, words: str) -> None:
    check = preflight.sender(sender, reply_to)
    assert check.ok is ok and words in check.detail


STATEMENT = {
    "resourceType": "CapabilityStatement",
    "fhirVersion": "4.0.1",
    "rest": [
        {
            "mode": "server",
            "resource": [
                {
                    "type": "Appointment",
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": [{"name": "date"}],
                }
            ],
        }
    ],
}


def test_strategy_declared_from_the_capability_statement() -> None:
    assert preflight.strategy_declared("ehr", "date-window", STATEMENT).detail == "search-type with date listed"
    unlisted = preflight.strategy_declared("ehr", "last-updated", STATEMENT)
    assert unlisted.ok and "_lastUpdated not listed" in unlisted.detail  # left to the probe
    history = preflight.strategy_declared("ehr", "history", STATEMENT)
    assert not history.ok and "history-type" in history.detail and "strategy" in (history.fix or "")
    assert not preflight.strategy_declared("ehr", "last-updated", {"resourceType": "CapabilityStatement"}).ok
    assert not preflight.capability("source ehr", {**STATEMENT, "fhirVersion": "3.0.2"}).ok
    assert not preflight.capability("source ehr", {"resourceType": "OperationOutcome"}).ok


@pytest.mark.parametrize(
    ("self_link", "on_ignored", "ok", "words"),
    [
        ("http://x/Appointment?_lastUpdated=ge2026&_sort=_lastUpdated", "fail", True, "2 appointment(s)"),
        ("http://x/Appointment?_lastUpdated=ge2026", "fail", True, "_sort ignored"),
        ("http://x/Appointment?_count=50", "fail", False, "ignored _lastUpdated"),
        ("http://x/Appointment?_count=50", "scan", True, "scan"),
        (None, "fail", False, "ignored _lastUpdated"),
    ],
)
def test_probe_verdicts(self_link: str | None, on_ignored: str, ok: bool, words: str) -> None:
    check = preflight.probe("ehr", "last-updated", self_link, 2, on_ignored)
    assert check.ok is ok and words in check.detail


def test_public_url_verdicts_and_lines() -> None:
    assert preflight.public_url("webhook ehr", 405).ok
    assert not preflight.public_url("webhook ehr", 404).ok
    bad = preflight.public_url("webhook ehr", 502)
    assert not bad.ok and preflight.line(bad).startswith("✗ webhook ehr: public URL: a proxy answered 502")
    assert preflight.line(bad).endswith(f"— {bad.fix}")
    assert preflight.line(Check("ledger", "writable", True, "fine", "never shown")) == "✓ ledger: writable: fine"
    assert not preflight.passed([])


# -- source auth -------------------------------------------------------------------------------------------


def smart_world(tokens: SmartTokenState) -> Any:
    """The FHIR test server with the SMART token server beside it (discovery and /token), on one origin."""
    fhir = FhirState(authorizer=tokens.check)
    auth_app, ehr_app = token_app(tokens), fhir_app(fhir)

    async def router(scope: Scope, receive: Receive, send: Send) -> None:
        target = auth_app if scope.get("path", "").startswith(("/.well-known/", "/token")) else ehr_app
        await target(scope, receive, send)

    return router


def test_smart_token_granted_narrowed_or_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    key = rsa.generate_private_key(65537, 2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "client-key.pem").write_bytes(pem)
    tokens = SmartTokenState()
    tokens.register("connector-test", "rsa-1", key.public_key())
    smart = (
        "    auth:\n      type: smart\n      client_id: connector-test\n      key_id: {kid}\n"
        "      private_key: {{file: client-key.pem}}\n"
    )
    with Server(smart_world(tokens)) as ehr, serve_paubox() as paubox:
        good = write_config(tmp_path, ehr.url, paubox.url, extra_source=smart.format(kid="rsa-1"), name="good.yaml")
        granted = by_name(asyncio.run(run(good)))
        tokens.granted_scope = "system/Appointment.rs"
        narrowed = by_name(asyncio.run(run(good)))
        tokens.granted_scope = None
        unknown = write_config(tmp_path, ehr.url, paubox.url, extra_source=smart.format(kid="nope"), name="bad.yaml")
        refused = asyncio.run(run(unknown))
    assert granted[("source ehr", "SMART token")].ok
    assert granted[("source ehr", "one-page probe")].ok
    narrow = narrowed[("source ehr", "SMART token")]
    assert not narrow.ok and narrow.detail == "granted, without system/Patient.rs"
    source = [(c.name, c.ok) for c in refused if c.part == "source ehr"]
    assert source[0] == ("SMART token", False) and all(not ok for _, ok in source)
    first = next(c for c in refused if c.part == "source ehr")
    assert "SMART token request" in first.detail and "answered HTTP" in first.detail, first
    assert "client_id, key_id, private_key" in (first.fix or "")


def test_a_wrong_bearer_token_fails_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    monkeypatch.setenv("FHIR_TOKEN", "not-the-token")
    state = FhirState()
    state.token = "fhir-test-token"
    auth = "    auth:\n      type: bearer\n      token: ${FHIR_TOKEN}\n"
    with serve_fhir(state) as fhir, serve_paubox() as paubox:
        config = write_config(tmp_path, fhir.url, paubox.url, extra_source=auth)
        checks = [c for c in asyncio.run(run(config)) if c.part == "source ehr"]
        monkeypatch.setenv("FHIR_TOKEN", "fhir-test-token")
        fixed = [c for c in asyncio.run(run(config)) if c.part == "source ehr"]
    failed = next(c for c in checks if not c.ok)
    assert failed.name == "auth" and "401" in failed.detail and failed.fix == "check sources.ehr.auth"
    assert all(c.ok for c in fixed), fixed
    assert fixed[-1] == Check("source ehr", "auth", True, "bearer accepted (the probe read a page with it)")


def test_check_has_help(tmp_path: Path) -> None:
    result = cli("check", "--help", cwd=tmp_path)
    assert "Usage:" in result.stdout and "--json" in result.stdout


async def test_an_unexpected_error_in_one_part_is_a_failed_check_of_that_part() -> None:
    async def broken() -> list[Check]:
        return [Check("x", "y", True, str(1 / 0))]

    checks = await guarded("source ehr", broken())
    assert len(checks) == 1 and not checks[0].ok
    assert checks[0].detail.startswith("unexpected ZeroDivisionError at ") and checks[0].part == "source ehr"


def test_history_strategy_against_a_server_with_and_without_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    results = {}
    for mode in ("full", "epic"):
        with serve_fhir(FhirState(mode=mode)) as fhir, serve_paubox() as paubox:
            config = write_config(tmp_path, fhir.url, paubox.url, source={"strategy": "history"}, name=f"{mode}.yaml")
            results[mode] = by_name(asyncio.run(run(config)))
    declared = ("source ehr", "strategy history declared")
    assert results["full"][declared].ok and results["full"][("source ehr", "one-page probe")].ok
    refused = results["epic"][declared]
    assert not refused.ok and refused.detail == "Appointment does not list the history-type interaction"
    assert "sources.ehr.strategy" in (refused.fix or "")
