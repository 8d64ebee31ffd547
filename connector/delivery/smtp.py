"""Paubox's SMTP relay over aiosmtplib: one MAIL/RCPT/DATA transaction per message, on a small pool of
authenticated connections.

Facts (../shared/docs/paubox-api.md, section 14): host `smtp.paubox.com`, username the literal `apikey`,
password the Email API key; 587 with STARTTLS or 465 with implicit TLS. SMTP returns no Paubox tracking id.
The conversation is driven step by step so that the moment the message content leaves is known:

    what happened                                                          verdict
    refused / DNS / TLS handshake / timeout / greeting not 220 / no EHLO   retry
    no STARTTLS offered (587), no AUTH offered, credentials rejected (5xx)  retry, blocking (configuration)
    530 / 538 (authentication required) to any command                      retry, blocking
    4xx reply to AUTH, MAIL, RCPT, DATA or to the content                   retry
    5xx reply to MAIL, RCPT, DATA or to the content                         failed ("SMTP 550 5.1.1 <address>: ...")
    timeout or disconnect before the content was written                    retry
    timeout or disconnect after the content was written, before the reply   in_doubt
    2xx reply to the content                                                sent (tracking_id "smtp:<queue id>" or None)
    the message cannot be built (line break in a header, non-ASCII address) failed

`signal` is server_error (for the mailer gate) on transport failures, on replies 421 and on setup replies
other than to AUTH; OK otherwise.

The password is sent only inside TLS. Nothing here logs or returns an address, a subject, a body, the
notification key or the password: reasons carry SMTP codes, server texts with addresses replaced, and
exception type names.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, make_msgid, parseaddr
from typing import Literal

import aiosmtplib
import structlog

from connector.delivery import Outcome, Signal, Verdict
from connector.delivery.paubox import NOTIFICATION_HEADER
from connector.errors import ConnectorError
from connector.models import Clock, Email, system_clock

log = structlog.get_logger("connector.delivery.smtp")

_ADDRESS = re.compile(r"<[^<>]*>|[^\s@<>\"',;:]+@[^\s@<>\"',;:]+")
_ENVELOPE = re.compile(r"[!-~]+@[!-~]+")  # printable ASCII; `<`, `>` excluded below
_QUEUE_ID = re.compile(r"\b(?:queued as|id=)\s*([A-Za-z0-9][A-Za-z0-9._-]{0,63})", re.IGNORECASE)
_LINE_END = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
_AUTH_REQUIRED = {530, 538}
_MAX_IDLE = 60.0  # seconds; servers and NATs drop idle SMTP sessions, so older ones are not reused


class _Unbuildable(ConnectorError):
    """The Email cannot become an SMTP message. Its text names no address or value."""


class _Stop(ConnectorError):
    """Ends a send early with a known Outcome (a configuration problem found while opening a session)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


@dataclass
class _Progress:
    replied: bool = False  # a reply of this transaction arrived (a reused connection was alive)
    content_sent: bool = False  # the message content was handed to the transport


@dataclass
class _Idle:
    smtp: aiosmtplib.SMTP
    since: float


def build_message(email: Email, *, now: datetime, message_id: str) -> EmailMessage:
    """The MIME message: text/plain, or multipart/alternative when there is HTML; UTF-8; CRLF policy."""
    msg = EmailMessage(policy=SMTP_POLICY)
    msg.set_content(email.text, charset="utf-8", cte=_transfer_encoding(email.text))
    if email.html:
        msg.add_alternative(email.html, subtype="html", charset="utf-8", cte=_transfer_encoding(email.html))
    for attachment in email.attachments:
        maintype, _, rest = attachment.content_type.partition("/")
        subtype, *options = (part.strip() for part in rest.split(";"))
        params = dict(option.partition("=")[::2] for option in options if "=" in option)
        msg.add_attachment(
            attachment.content, maintype=maintype, subtype=subtype, filename=attachment.filename, params=params
        )
    msg["From"] = email.from_address
    msg["To"] = email.to
    msg["Subject"] = email.subject
    if email.reply_to:
        msg["Reply-To"] = email.reply_to
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id
    for name, value in email.headers.items():
        if name.lower().startswith("content-") or name.lower() == "mime-version":
            raise _Unbuildable(f"header {name!r} is set by the mailer")
        del msg[name]
        msg[name] = value
    del msg[NOTIFICATION_HEADER]
    msg[NOTIFICATION_HEADER] = email.notification_key
    return msg


def _transfer_encoding(text: str) -> str | None:
    """Quoted-printable for non-ASCII text, so that no part needs the server's 8BITMIME."""
    return None if text.isascii() else "quoted-printable"


def envelope_address(header_value: str, role: str) -> str:
    """The bare ASCII address of a From/To value, for MAIL FROM and RCPT TO (no SMTPUTF8)."""
    address = parseaddr(header_value)[1]
    if not _ENVELOPE.fullmatch(address) or "<" in address or ">" in address:
        raise _Unbuildable(f"the {role} is not a plain ASCII address")
    return address


def wire_content(msg: EmailMessage) -> bytes:
    """The DATA payload: CRLF line ends, leading dots doubled, terminated by `.` alone on a line."""
    data = _LINE_END.sub(b"\r\n", msg.as_bytes())
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return _LEADING_DOT.sub(b"..", data) + b".\r\n"


def reply_reason(code: int, text: str) -> str:
    """`SMTP <code> <first line of the text>`, with anything like an address replaced by `<address>`."""
    lines = text.strip().splitlines()
    short = _ADDRESS.sub("<address>", lines[0] if lines else "")[:160]
    return f"SMTP {code} {short}".rstrip()


def classify_reply(code: int, text: str, *, content_sent: bool) -> Outcome:
    """What a reply to MAIL, RCPT, DATA or to the content means for the notification."""
    reason = reply_reason(code, text)
    if content_sent and 200 <= code < 300:
        match = _QUEUE_ID.search(text)
        return Outcome(Verdict.SENT, reason, tracking_id=f"smtp:{match.group(1)}" if match else None)
    if code in _AUTH_REQUIRED:
        return Outcome(Verdict.RETRY, f"{reason}: the session is not authenticated", blocking=True)
    if 400 <= code < 500:
        return Outcome(Verdict.RETRY, reason, signal=Signal.SERVER_ERROR if code == 421 else Signal.OK)
    if 500 <= code < 600:
        return Outcome(Verdict.FAILED, reason)
    if content_sent:
        return Outcome(Verdict.IN_DOUBT, f"{reason}: unexpected reply to the content")
    return Outcome(Verdict.RETRY, f"{reason}: unexpected reply, not sent")


def classify_exception(exc: BaseException, *, content_sent: bool) -> Outcome:
    """Transport failures: before the content left, nothing was sent; after, the outcome is unknown."""
    kind = type(exc).__name__
    if exc.__cause__ is not None:
        kind += f" ({type(exc.__cause__).__name__})"
    if content_sent:
        return Outcome(Verdict.IN_DOUBT, f"no reply after the content was sent: {kind}", signal=Signal.SERVER_ERROR)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        if 400 <= exc.code < 500:
            return Outcome(Verdict.RETRY, f"SMTP {exc.code} authentication failed temporarily")
        return Outcome(
            Verdict.RETRY,
            f"SMTP {exc.code} authentication failed: check the SMTP username and password (the Paubox API key)",
            blocking=True,
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return Outcome(Verdict.RETRY, f"not sent: {reply_reason(exc.code, exc.message)}", signal=Signal.SERVER_ERROR)
    return Outcome(Verdict.RETRY, f"not sent: {kind}", signal=Signal.SERVER_ERROR)


class PauboxSmtpMailer:
    """Sends through an SMTP relay with STARTTLS (587) or implicit TLS (465) and AUTH, reusing connections."""

    def __init__(
        self,
        *,
        host: str = "smtp.paubox.com",
        port: int = 587,
        security: Literal["starttls", "tls"] = "starttls",
        username: str = "apikey",
        password: str,
        timeout: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
        max_connections: int = 2,
        clock: Clock = system_clock,
    ) -> None:
        if security not in ("starttls", "tls"):
            raise ValueError("security must be 'starttls' or 'tls'")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._host, self._port, self._security = host, port, security
        self._username, self._password, self._timeout = username, password, timeout
        self._tls_context = tls_context or ssl.create_default_context()
        self._clock = clock
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Idle] = []
        self._closed = False

    async def send(self, email: Email) -> Outcome:
        try:
            sender = envelope_address(email.from_address, "sender")
            recipient = envelope_address(email.to, "recipient")
            domain = sender.rpartition("@")[2]
            msg = build_message(email, now=self._clock(), message_id=make_msgid(domain=domain))
            content = wire_content(msg)
        except _Unbuildable as exc:
            return Outcome(Verdict.FAILED, f"message could not be built: {exc}")
        except Exception as exc:  # noqa: BLE001 - nothing was sent; their texts may quote values
            return Outcome(Verdict.FAILED, f"message could not be built: {type(exc).__name__}")
        async with self._slots:
            if self._closed:
                return Outcome(Verdict.RETRY, "not sent: mailer closed")
            while True:  # again only when a reused connection turned out closed (each is tried once)
                smtp, reused = await self._take()
                progress = _Progress()
                reusable = False
                try:
                    if smtp is None:
                        smtp = await self._open()
                    outcome, reusable = await self._transact(smtp, sender, recipient, content, progress)
                    return outcome
                except _Stop as stop:
                    return stop.outcome
                except (aiosmtplib.SMTPException, OSError) as exc:
                    stale = reused and not progress.replied and isinstance(exc, ConnectionError)
                    if not stale:
                        log.debug("smtp.send_failed", error=type(exc).__name__, content_sent=progress.content_sent)
                        return classify_exception(exc, content_sent=progress.content_sent)
                except Exception as exc:  # noqa: BLE001 - a bug: in doubt only once the content may have left
                    return classify_exception(exc, content_sent=progress.content_sent)
                finally:
                    if smtp is not None:
                        self._give_back(smtp, reusable)

    async def probe(self) -> str | None:
        """Connect, secure, authenticate and QUIT without sending anything (`connector check`): None when
        every step passed, else what failed."""
        try:
            smtp = await self._open()
        except _Stop as stop:
            return stop.outcome.reason
        except (aiosmtplib.SMTPException, OSError) as exc:
            return classify_exception(exc, content_sent=False).reason
        try:
            await smtp.quit(timeout=self._timeout)
        except (aiosmtplib.SMTPException, OSError) as exc:
            return f"QUIT failed: {type(exc).__name__}"
        finally:
            smtp.close()
        return None

    async def aclose(self) -> None:
        """Quit every idle connection; connections in use are closed when their send ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for entry in idle:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await entry.smtp.quit(timeout=min(self._timeout, 5.0))
            entry.smtp.close()

    async def _take(self) -> tuple[aiosmtplib.SMTP | None, bool]:
        """An idle, recently used, still connected session, or None when a new one must be opened."""
        now = asyncio.get_running_loop().time()
        while self._idle:
            entry = self._idle.pop()
            if entry.smtp.is_connected and now - entry.since < _MAX_IDLE:
                return entry.smtp, True
            entry.smtp.close()
        return None, False

    def _give_back(self, smtp: aiosmtplib.SMTP, reusable: bool) -> None:
        if reusable and not self._closed and smtp.is_connected:
            self._idle.append(_Idle(smtp, asyncio.get_running_loop().time()))
        else:
            smtp.close()

    async def _open(self) -> aiosmtplib.SMTP:
        """Connect, secure and authenticate a session; the password never travels outside TLS."""
        implicit = self._security == "tls"
        smtp = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            timeout=self._timeout,
            use_tls=implicit,
            start_tls=False,
            tls_context=self._tls_context,
        )
        try:
            await smtp.connect()
            await smtp.ehlo()
            if not implicit:
                if not smtp.supports_extension("starttls"):
                    raise _Stop(
                        Outcome(
                            Verdict.RETRY,
                            "not sent: the SMTP server does not offer STARTTLS; check delivery.smtp host/port/security",
                            blocking=True,
                        )
                    )
                await smtp.starttls()
                await smtp.ehlo()
            if not smtp.supports_extension("auth") or not smtp.supported_auth_methods:
                raise _Stop(
                    Outcome(Verdict.RETRY, "not sent: the SMTP server offers no usable AUTH mechanism", blocking=True)
                )
            await smtp.login(self._username, self._password)
        except BaseException:
            smtp.close()
            raise
        log.debug("smtp.connected", security=self._security)
        return smtp

    async def _transact(
        self, smtp: aiosmtplib.SMTP, sender: str, recipient: str, content: bytes, progress: _Progress
    ) -> tuple[Outcome, bool]:
        """MAIL, RCPT, DATA, then the content; returns the outcome and whether the session can be reused."""
        steps: list[tuple[tuple[bytes, ...], tuple[int, ...]]] = [
            ((b"MAIL", b"FROM:<" + sender.encode() + b">"), (250,)),
            ((b"RCPT", b"TO:<" + recipient.encode() + b">"), (250, 251)),
            ((b"DATA",), (354,)),
        ]
        for command, expected in steps:
            reply = await smtp.execute_command(*command)
            progress.replied = True
            if reply.code not in expected:
                return classify_reply(reply.code, reply.message, content_sent=False), await self._reset(smtp)
        protocol = smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        protocol.write(content)
        progress.content_sent = True
        reply = await protocol.read_response(timeout=self._timeout)
        return classify_reply(reply.code, reply.message, content_sent=True), reply.code != 421

    async def _reset(self, smtp: aiosmtplib.SMTP) -> bool:
        """RSET after a refused command; True when the session is still usable."""
        if not smtp.is_connected:
            return False
        try:
            reply = await smtp.execute_command(b"RSET")
        except (aiosmtplib.SMTPException, OSError):
            return False
        return reply.code == 250
