"""The HTTP server of `connector run` (uvicorn over h11), set up for callers on an open network.

- Proxies. uvicorn believes `X-Forwarded-For` and `X-Forwarded-Proto` from 127.0.0.1 by default, so any
  local process (or a local proxy's clients, when it passes the header on) could choose its source address
  and pass `webhook_allow_ips`. Here they are believed only from `server.trusted_proxies`; by default from
  nobody.
- Slow clients. uvicorn's only read timeout is the keep-alive one, and every byte received resets it: a
  client sending one byte a second keeps a connection (and its memory) forever. `TimedH11Protocol` gives a
  request `server.header_timeout` to deliver its headers, else the connection is closed, and then
  `server.body_timeout` for its body, else it is answered 408 and closed. Both are totals, not per read.
- h11 is used whether or not httptools is installed, so that these timeouts always apply; no websockets.
- The socket is bound before the daemon starts (`listen`), so that a port in use is a clear error; the
  server runs inside the daemon's loop, and the daemon, not uvicorn, owns SIGTERM and SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
from collections.abc import Generator
from typing import TYPE_CHECKING

import h11
import structlog
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from connector import metrics
from connector.errors import InfrastructureError

if TYPE_CHECKING:
    from connector.config.server import ServerConfig

log = structlog.get_logger("connector.web")

_TIMEOUT_BODY = json.dumps({"type": "about:blank", "title": "Request Timeout", "status": 408}).encode()


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers and one for its body."""

    header_timeout = 10.0
    body_timeout = 30.0
    _deadline: asyncio.TimerHandle | None = None
    _phase: str | None = None  # what the deadline waits for: "headers" or "body"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Arm the deadline that fits what the client owes us now: a request's headers (h11 IDLE) or its
        body (SEND_BODY); nothing otherwise. A deadline runs on until that part has fully arrived."""
        state = self.conn.their_state
        phase = (
            None
            if self.transport.is_closing()
            else "headers"
            if state is h11.IDLE
            else "body"
            if state is h11.SEND_BODY
            else None
        )
        if phase == self._phase:
            return
        self._disarm()
        if phase is not None:
            seconds = self.header_timeout if phase == "headers" else self.body_timeout
            self._phase, self._deadline = phase, self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._phase = None

    def _expired(self, phase: str) -> None:
        self._deadline = self._phase = None
        if self.transport.is_closing():
            return
        metrics.inc("connector_http_timeouts_total", phase=phase)
        log.info(
            "request.timed_out",
            phase=phase,
            limit=f"{self.header_timeout if phase == 'headers' else self.body_timeout:g}s",
        )
        cycle: RequestResponseCycle | None = self.cycle
        if cycle is not None and not cycle.response_complete:
            if phase == "body" and not cycle.response_started:
                self._answer_408(cycle)
            cycle.disconnected = True  # the endpoint, waiting for the body, is told the client went away
            cycle.message_event.set()
        self.transport.close()

    def _answer_408(self, cycle: RequestResponseCycle) -> None:
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"connection", b"close"),
            (b"content-length", str(len(_TIMEOUT_BODY)).encode()),
        ]
        try:
            for event in (
                h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                h11.Data(data=_TIMEOUT_BODY),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event) or b"")
        except h11.LocalProtocolError:  # the connection was in no state to answer: closing is enough
            return
        cycle.response_started = cycle.response_complete = True


def timed_protocol(header_timeout: float, body_timeout: float) -> type[TimedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, with these limits (in seconds)."""

    class Configured(TimedH11Protocol):
        pass

    Configured.header_timeout, Configured.body_timeout = header_timeout, body_timeout
    return Configured


def remember_peer(app: ASGIApp) -> ASGIApp:
    """Keep the address of the immediate peer in the scope (`connector.peer`) before proxy headers replace
    `client`: the console believes a single sign-on header only from a trusted proxy itself."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("client"):
            scope["connector.peer"] = scope["client"][0]
        await app(scope, receive, send)

    return wrapped


def server_config(app: ASGIApp, settings: ServerConfig) -> uvicorn.Config:
    """How `connector run` serves `app`. Access log off: request lines would carry the webhook path token.
    Proxy headers are applied here (not by uvicorn) so that `remember_peer` sees the peer first."""
    trusted = [str(network) for network in settings.trusted_proxies]
    if trusted:
        app = remember_peer(ProxyHeadersMiddleware(app, trusted_hosts=trusted))  # type: ignore[arg-type]
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        log_config=None,  # no handlers of uvicorn's own: its lines go through connector.logs (structlog)
        access_log=False,
        lifespan="off",
        http=timed_protocol(settings.header_timeout.total_seconds(), settings.body_timeout.total_seconds()),
        ws="none",
        proxy_headers=False,
        server_header=False,
    )


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside the daemon's loop; the daemon, not uvicorn, owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def listen(settings: ServerConfig) -> socket.socket:
    """The server's socket, bound before the daemon starts, so that a port in use is a clear error."""
    host, port = settings.host, settings.port
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # as uvicorn binds it
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        return sock
    except socket.gaierror:
        sock.close()
        raise InfrastructureError(
            f"server.host {host!r} is not a known address: use 127.0.0.1, 0.0.0.0 or an address of this machine"
        ) from None
    except OSError as exc:
        sock.close()
        what = {
            errno.EADDRINUSE: "is already in use: stop the process using it, or choose another server.port",
            errno.EACCES: "needs privileges: choose a server.port above 1023",
            errno.EADDRNOTAVAIL: "is not on an address of this machine: fix server.host",
        }
        problem = what.get(exc.errno or 0, f"cannot be opened ({exc.strerror}): check server.host and server.port")
        raise InfrastructureError(f"port {port} on {host} {problem}") from exc
