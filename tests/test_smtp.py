"""The SMTP mailer against a real aiosmtpd server on 127.0.0.1: STARTTLS, AUTH, pooling, classification.

Certificates come from a throw-away CA made at test time (trustme); no key file exists outside a test run.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any, Literal

import pytest
import trustme
from aiosmtpd.smtp import SMTP as SmtpServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from connector.delivery import Signal, Verdict
from connector.delivery.smtp import PauboxSmtpMailer, reply_reason
from connector.models import Attachment, Email
from connector.testing import free_port

PASSWORD = "test-api-key-5f3a9c"
EMAIL = Email(
    notification_key="ehr:m:a1|booked",
    to="Pat One <pat.one@example.org>",
    from_address="Clinic <appointments@example.org>",
    subject="Your appointment ✓",
    text="Hello Pat,\n.see you soon\n",
    html="<p>Hëllo Pat</p>",
    reply_to="desk@example.org",
    headers={"X-Campaign": "reminders"},
)

Mode = Literal["starttls", "plain", "tls"]


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext
    ca: trustme.CA


@dataclass
class Relay:
    """What one test server saw, and how it should answer."""

    connections: int = 0
    wire: bytearray = field(default_factory=bytearray)  # every byte clients sent (after TLS decryption)
    logins: list[tuple[str, bytes, bool]] = field(default_factory=list)  # mechanism, username, under TLS
    messages: list[Envelope] = field(default_factory=list)
    sessions: list[RecordingServer] = field(default_factory=list)
    rcpt_reply: str | None = None
    hang_after_data: bool = False

    def authenticate(
        self, server: SmtpServer, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        under_tls = server.transport is not None and server.transport.get_extra_info("sslcontext") is not None
        self.logins.append((mechanism, auth_data.login, under_tls))
        valid = auth_data.login == b"apikey" and auth_data.password == PASSWORD.encode()
        return AuthResult(success=valid, handled=False)  # handled=False: aiosmtpd sends 235 or 535 itself

    async def handle_MAIL(
        self, server: SmtpServer, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(
        self, server: SmtpServer, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SmtpServer, session: Session, envelope: Envelope) -> str:
        if self.hang_after_data:
            await asyncio.Event().wait()  # cancelled by aiosmtpd when the client goes away
        self.messages.append(envelope)
        return "250 2.0.0 Ok: queued as Q1234AB"


class RecordingServer(SmtpServer):
    def __init__(self, relay: Relay, **kwargs: Any) -> None:
        super().__init__(relay, authenticator=relay.authenticate, hostname="smtp.test", **kwargs)
        self.relay = relay
        relay.sessions.append(self)

    def data_received(self, data: bytes) -> None:
        self.relay.wire.extend(data)
        super().data_received(data)


@pytest.fixture(scope="module")
def tls() -> Tls:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Tls(server, client, ca)


StartRelay = Callable[[Relay, Mode], Awaitable[int]]


@pytest.fixture
async def start_relay(tls: Tls) -> AsyncIterator[StartRelay]:
    """Starts aiosmtpd servers on the test's loop: `starttls` (required, then AUTH required), `plain` (no
    STARTTLS, AUTH offered in clear: a misconfigured server) or `tls` (implicit TLS). Yields the port."""
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    relays: list[Relay] = []

    async def start(relay: Relay, mode: Mode) -> int:
        def factory() -> RecordingServer:
            relay.connections += 1
            if mode == "starttls":
                options: dict[str, Any] = {"tls_context": tls.server, "require_starttls": True, "auth_required": True}
            else:  # aiosmtpd does not count implicit TLS as TLS for AUTH; handle_MAIL still demands AUTH
                options = {"auth_require_tls": False}
            return RecordingServer(relay, loop=loop, **options)

        server = await loop.create_server(factory, "127.0.0.1", 0, ssl=tls.server if mode == "tls" else None)
        servers.append(server)
        relays.append(relay)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for session in (session for relay in relays for session in relay.sessions):
        if session.transport is not None:
            session.transport.close()
    for server in servers:
        server.close()
        await server.wait_closed()
    await asyncio.sleep(0.05)  # let the closing transports finish their TLS shutdown


MakeMailer = Callable[..., PauboxSmtpMailer]


@pytest.fixture
async def make_mailer(tls: Tls, start_relay: StartRelay) -> AsyncIterator[MakeMailer]:
    """Mailers on 127.0.0.1 that trust the test CA; closed before the servers stop."""
    mailers: list[PauboxSmtpMailer] = []

    def make(port: int, **overrides: Any) -> PauboxSmtpMailer:
        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": port,
            "password": PASSWORD,
            "timeout": 5.0,
            "tls_context": tls.client,
        }
        options.update(overrides)
        mailer = PauboxSmtpMailer(**options)
        mailers.append(mailer)
        return mailer

    yield make
    for mailer in mailers:
        await mailer.aclose()


def parsed(envelope: Envelope) -> EmailMessage:
    assert isinstance(envelope.content, bytes)
    message = message_from_bytes(envelope.content, policy=default_policy)
    assert isinstance(message, EmailMessage)
    return message


async def test_delivers_through_starttls_and_auth(start_relay: StartRelay, make_mailer: MakeMailer) -> None:
    """A message goes through STARTTLS + AUTH PLAIN as `apikey`; the server receives the envelope recipient,
    the X-Notification-Key header and both parts; the queue id becomes the tracking id."""
    relay = Relay()
    outcome = await make_mailer(await start_relay(relay, "starttls")).send(EMAIL)

    assert outcome.verdict is Verdict.SENT
    assert outcome.tracking_id == "smtp:Q1234AB"
    assert relay.logins == [("PLAIN", b"apikey", True)]
    [envelope] = relay.messages
    assert envelope.mail_from == "appointments@example.org"
    assert envelope.rcpt_tos == ["pat.one@example.org"]
    message = parsed(envelope)
    assert message["X-Notification-Key"] == "ehr:m:a1|booked"
    assert message["Subject"] == "Your appointment ✓"
    assert message["Reply-To"] == "desk@example.org"
    assert message["X-Campaign"] == "reminders"
    assert message["Message-ID"].endswith("@example.org>") and message["Date"]
    assert message.get_content_type() == "multipart/alternative"
    plain, html = message.get_body(("plain",)), message.get_body(("html",))
    assert plain is not None and html is not None
    assert isinstance(plain, EmailMessage) and isinstance(html, EmailMessage)
    assert plain.get_content().replace("\r\n", "\n") == "Hello Pat,\n.see you soon\n"  # dot-stuffing undone
    assert html.get_content().strip() == "<p>Hëllo Pat</p>"


async def test_two_sends_reuse_one_connection(start_relay: StartRelay, make_mailer: MakeMailer) -> None:
    """Consecutive sends go over the same authenticated session: one connection, one login."""
    relay = Relay()
    mailer = make_mailer(await start_relay(relay, "starttls"))
    first, second = await mailer.send(EMAIL), await mailer.send(EMAIL)

    assert first.verdict is second.verdict is Verdict.SENT
    assert len(relay.messages) == 2
    assert relay.connections == 1
    assert len(relay.logins) == 1


async def test_wrong_password_is_a_blocking_retry(start_relay: StartRelay, make_mailer: MakeMailer) -> None:
    """Rejected credentials are configuration: RETRY with blocking, nothing delivered, no secret in the reason."""
    relay = Relay()
    outcome = await make_mailer(await start_relay(relay, "starttls"), password="wrong-key").send(EMAIL)

    assert outcome.verdict is Verdict.RETRY and outcome.blocking
    assert outcome.reason.startswith("SMTP 535")
    assert "wrong-key" not in outcome.reason
    assert relay.messages == []


async def test_rcpt_4xx_retries_and_5xx_fails_without_address(start_relay: StartRelay, make_mailer: MakeMailer) -> None:
    """451 to RCPT → RETRY (not blocking); 550 → FAILED with the server text, addresses replaced; the session
    survives both (RSET) and is reused."""
    relay = Relay(rcpt_reply="451 4.3.0 Try again later")
    mailer = make_mailer(await start_relay(relay, "starttls"))
    temporary = await mailer.send(EMAIL)
    relay.rcpt_reply = "550 5.1.1 <pat.one@example.org>: Recipient address rejected: user pat.one@example.org"
    permanent = await mailer.send(EMAIL)

    assert temporary.verdict is Verdict.RETRY and not temporary.blocking and temporary.signal is Signal.OK
    assert temporary.reason == "SMTP 451 4.3.0 Try again later"
    assert permanent.verdict is Verdict.FAILED
    assert permanent.reason == "SMTP 550 5.1.1 <address>: Recipient address rejected: user <address>"
    assert "pat.one" not in permanent.reason and "example.org" not in permanent.reason
    assert relay.messages == []
    assert relay.connections == 1


async def test_no_reply_after_content_is_in_doubt(start_relay: StartRelay, make_mailer: MakeMailer) -> None:
    """A server that takes the content and never answers: IN_DOUBT after the client timeout; the broken
    session is discarded and the next send opens a new one."""
    relay = Relay(hang_after_data=True)
    mailer = make_mailer(await start_relay(relay, "starttls"), timeout=1.0)
    started = time.monotonic()
    outcome = await mailer.send(EMAIL)

    assert outcome.verdict is Verdict.IN_DOUBT and outcome.signal is Signal.SERVER_ERROR
    assert "ReadTimeout" in outcome.reason
    assert time.monotonic() - started < 4
    relay.hang_after_data = False
    assert (await mailer.send(EMAIL)).verdict is Verdict.SENT
    assert relay.connections == 2


async def test_server_without_starttls_never_sees_the_password(
    start_relay: StartRelay, make_mailer: MakeMailer
) -> None:
    """Port 587 without STARTTLS: RETRY blocking, and no AUTH command (so no password) crosses the wire even
    though the server offers AUTH in clear."""
    relay = Relay()
    outcome = await make_mailer(await start_relay(relay, "plain")).send(EMAIL)

    assert outcome.verdict is Verdict.RETRY and outcome.blocking
    assert "STARTTLS" in outcome.reason
    assert relay.logins == []
    assert b"AUTH" not in bytes(relay.wire).upper()
    assert PASSWORD.encode() not in relay.wire
    assert relay.messages == []


async def test_implicit_tls(start_relay: StartRelay, make_mailer: MakeMailer) -> None:
    """`security="tls"` (port 465 style) talks TLS from the first byte, then authenticates and delivers."""
    relay = Relay()
    outcome = await make_mailer(await start_relay(relay, "tls"), security="tls").send(EMAIL)

    assert outcome.verdict is Verdict.SENT
    assert relay.logins == [("PLAIN", b"apikey", True)]
    assert parsed(relay.messages[0])["X-Notification-Key"] == "ehr:m:a1|booked"


async def test_untrusted_certificate_is_not_sent(start_relay: StartRelay, make_mailer: MakeMailer) -> None:
    """A certificate the client does not trust stops the session before AUTH: RETRY, password never sent."""
    relay = Relay()
    outcome = await make_mailer(await start_relay(relay, "starttls"), tls_context=ssl.create_default_context()).send(
        EMAIL
    )

    assert outcome.verdict is Verdict.RETRY
    assert "SSLCertVerificationError" in outcome.reason
    assert relay.logins == []


async def test_connection_refused_is_a_plain_retry(make_mailer: MakeMailer) -> None:
    """Nothing listening: RETRY, not blocking (the relay may come back), a server-error signal."""
    outcome = await make_mailer(free_port()).send(EMAIL)

    assert outcome.verdict is Verdict.RETRY and not outcome.blocking
    assert outcome.signal is Signal.SERVER_ERROR  # counts towards the mailer gate's circuit breaker
    assert outcome.reason.startswith("not sent: SMTPConnectError")


async def test_session_closed_by_server_is_replaced(start_relay: StartRelay, make_mailer: MakeMailer) -> None:
    """When the server drops a pooled session (the client has not noticed yet), the next send finds it dead
    before anything was sent, opens a new session and delivers once."""
    relay = Relay()
    mailer = make_mailer(await start_relay(relay, "starttls"))
    assert (await mailer.send(EMAIL)).verdict is Verdict.SENT
    for session in relay.sessions:
        assert session.transport is not None
        session.transport.close()
    outcome = await mailer.send(EMAIL)

    assert outcome.verdict is Verdict.SENT
    assert relay.connections == 2
    assert len(relay.messages) == 2


async def test_unbuildable_message_fails_without_connecting(start_relay: StartRelay, make_mailer: MakeMailer) -> None:
    """A header value with a line break cannot be sent: FAILED, no connection opened, no value in the reason."""
    relay = Relay()
    bad = Email(
        notification_key="k",
        to="pat.one@example.org",
        from_address="appointments@example.org",
        subject="Hi\r\nBcc: other@example.org",
        text="t",
    )
    outcome = await make_mailer(await start_relay(relay, "starttls")).send(bad)

    assert outcome.verdict is Verdict.FAILED
    assert outcome.reason == "message could not be built: ValueError"
    assert relay.connections == 0


def test_reply_reason_hides_addresses() -> None:
    """Only the first line is kept, and bracketed or bare addresses become `<address>`."""
    assert reply_reason(550, "5.1.1 <pat@x.org> unknown\nmore") == "SMTP 550 5.1.1 <address> unknown"
    assert reply_reason(552, "mailbox pat@x.org full") == "SMTP 552 mailbox <address> full"


async def test_the_pipeline_sends_through_the_relay_when_configured(
    tls: Tls, start_relay: StartRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `transport: paubox-smtp` the daemon's whole path ends at the relay: STARTTLS, AUTH, the key header,
    and a `sent` notification carrying the relay's queue id."""
    from datetime import UTC, datetime, timedelta

    import httpx

    from connector.config import load_config
    from connector.daemon import run_once
    from connector.models import State, system_clock
    from connector.runtime import Runtime
    from connector.sandbox.fhir import FhirState
    from connector.sandbox.fhir import create_app as fhir_app
    from tests.conftest import BASIC, write_config
    from tests.factories import appointment, patient

    relay = Relay()
    port = await start_relay(relay, "starttls")
    tls.ca.cert_pem.write_to_path(str(tmp_path / "relay-ca.pem"))
    monkeypatch.setenv("PAUBOX_API_KEY", PASSWORD)
    config_path = write_config(
        tmp_path,
        "http://fhir.test",
        "https://paubox.test",
        mappings=BASIC,
        delivery_extra="  transport: paubox-smtp\n"
        f"  smtp:\n    host: 127.0.0.1\n    port: {port}\n"
        "    ca_file: relay-ca.pem\n    timeout: 5s\n",
    )
    fhir = FhirState()
    fhir.put(patient("p1", "Robin", email="robin@example.org"))
    fhir.put(appointment("a1", "p1", datetime.now(UTC) + timedelta(days=3)))
    runtime = Runtime.open(
        load_config(config_path), system_clock, source_transport=httpx.ASGITransport(app=fhir_app(fhir))
    )
    try:
        await run_once(runtime)
        [record] = runtime.ledger.reports.notifications([State.SENT], 10)
    finally:
        await runtime.aclose()
    [envelope] = relay.messages
    message = parsed(envelope)
    assert message["X-Notification-Key"] == record.key
    assert record.tracking_id == "smtp:Q1234AB"
    assert relay.logins and all(under_tls for _, _, under_tls in relay.logins)


async def test_one_click_headers_and_a_calendar_file_go_through_the_relay(
    start_relay: StartRelay, make_mailer: MakeMailer
) -> None:
    """The SMTP relay gets RFC 8058's two headers as they are, and the iCalendar attachment beside the text
    and HTML parts, with its method in the content type."""
    unsubscribe = "<https://connector.example.org/links/unsubscribe/k1.eyJuIjoxfQ.sig>"
    ics = b"BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nEND:VCALENDAR\r\n"
    email = replace(
        EMAIL,
        headers={"List-Unsubscribe": unsubscribe, "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
        attachments=(Attachment("appointment.ics", "text/calendar; method=REQUEST", ics),),
    )
    relay = Relay()
    outcome = await make_mailer(await start_relay(relay, "starttls")).send(email)
    assert outcome.verdict is Verdict.SENT
    message = parsed(relay.messages[0])
    assert message["List-Unsubscribe"].strip() == unsubscribe  # a long value is folded onto its own line
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message.get_content_type() == "multipart/mixed"
    [calendar] = list(message.iter_attachments())
    assert isinstance(calendar, EmailMessage)
    assert calendar.get_content_type() == "text/calendar" and calendar.get_param("method") == "REQUEST"
    assert calendar.get_filename() == "appointment.ics" and calendar.get_content().encode() == ics
    assert message.get_body(("plain",)) is not None and message.get_body(("html",)) is not None
