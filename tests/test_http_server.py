"""The HTTP server `connector run` serves, over real sockets on 127.0.0.1: forwarded headers believed only
from configured proxies, a deadline for a request's headers and one for its body, disconnects that are
not errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from connector.config import load_config
from connector.daemon import web_server
from connector.models import system_clock
from connector.runtime import Runtime
from tests.conftest import BASIC, free_port, write_config

TOKEN = "paubox-webhook-path-token-0123456789"
SECRET = "Bearer subscription-secret-for-tests"
HEADER_TIMEOUT, BODY_TIMEOUT = 2.0, 1.5
Serve = Callable[[str], Awaitable[int]]


@pytest.fixture
async def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Serve]:
    """Start `connector run`'s HTTP server (as the daemon builds it) with extra `server:` lines; yields its port."""
    monkeypatch.setenv("PAUBOX_API_KEY", "test-sandbox-key")
    monkeypatch.setenv("WEBHOOK_TOKEN", TOKEN)
    monkeypatch.setenv("SUB_SECRET", SECRET)
    started: list[tuple[Runtime, Any, asyncio.Task[None]]] = []

    async def start(server_extra: str) -> int:
        port = free_port()
        config = load_config(
            write_config(
                tmp_path,
                "http://127.0.0.1:9",
                "http://127.0.0.1:9",
                mappings=BASIC,
                extra_source="    subscription:\n      enabled: true\n      secret: ${SUB_SECRET}\n",
                paubox_extra="    webhook_token: ${WEBHOOK_TOKEN}\n    webhook_allow_ips: [203.0.113.7]\n",
                extra=f"server:\n  port: {port}\n  header_timeout: {HEADER_TIMEOUT}s\n  body_timeout: {BODY_TIMEOUT}s\n"
                + server_extra,
            )
        )
        runtime = Runtime.open(config, system_clock)
        server = web_server(runtime)
        assert server is not None
        task = asyncio.create_task(server.serve())
        started.append((runtime, server, task))
        while not server.started:
            await asyncio.sleep(0.01)
        return port

    yield start
    for runtime, server, task in started:
        server.should_exit = True
        await task
        await runtime.aclose()


async def paubox_status(port: int, forwarded_for: str) -> int:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        response = await client.post(f"/webhooks/paubox/{TOKEN}", json={}, headers={"X-Forwarded-For": forwarded_for})
        return response.status_code


async def test_a_forged_forwarded_for_from_loopback_does_not_pass_the_webhook_allowlist(serve: Serve) -> None:
    port = await serve("")
    assert await paubox_status(port, "203.0.113.7") == 403


async def test_a_forwarded_for_from_a_configured_proxy_is_believed(serve: Serve) -> None:
    port = await serve("  trusted_proxies: [127.0.0.1/32]\n")
    assert await paubox_status(port, "203.0.113.7") == 400  # allowed; `{}` is no Paubox event
    assert await paubox_status(port, "198.51.100.1") == 403
    assert await paubox_status(port, "203.0.113.7, 198.51.100.1") == 403  # the nearest untrusted hop counts


async def drip(port: int, head: bytes, drip: bytes, every: float, give_up: float) -> tuple[bytes, float]:
    """Send `head` at once, then `drip` a byte every `every` seconds. Returns what the server answered and
    when the connection was closed (seconds after the first drip), or `give_up` if it never was."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    started = time.monotonic()
    answer = b""
    try:
        for byte in drip:
            if time.monotonic() - started > give_up:
                return answer, give_up
            try:
                writer.write(bytes([byte]))
                await writer.drain()
                chunk = await asyncio.wait_for(reader.read(4096), every)
            except TimeoutError:
                continue
            except ConnectionError:
                return answer, time.monotonic() - started
            answer += chunk
            if not chunk:
                return answer, time.monotonic() - started
        return answer, give_up
    finally:
        writer.close()


async def test_headers_sent_one_byte_a_second_are_cut_off_at_the_header_timeout(serve: Serve) -> None:
    port = await serve("")
    head = b"GET /healthz HTTP/1.1\r\nHost: connector.example.org\r\nX-Slow: " + b"a" * 60 + b"\r\n\r\n"
    with capture_logs() as logs:
        answer, closed_after = await drip(port, b"", head, every=1.0, give_up=3 * HEADER_TIMEOUT)
    assert closed_after < 2 * HEADER_TIMEOUT and answer == b""
    assert {"event": "request.timed_out", "phase": "headers", "limit": "2s", "log_level": "info"} in logs


async def test_a_body_dripping_slowly_gets_a_408_at_the_body_timeout_and_is_no_crash(serve: Serve) -> None:
    port = await serve("")
    head = (
        b"POST /fhir/ehr/notify HTTP/1.1\r\nHost: connector.example.org\r\nContent-Type: application/json\r\n"
        b"Authorization: " + SECRET.encode() + b"\r\nContent-Length: 200\r\n\r\n"
    )
    with capture_logs() as logs:
        answer, closed_after = await drip(port, head, b"{" + b" " * 199, every=0.25, give_up=3 * BODY_TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b'"status": 408' in answer
    assert closed_after < 2 * BODY_TIMEOUT
    await asyncio.sleep(0.1)  # the endpoint learns that the client is gone
    events = [entry["event"] for entry in logs]
    assert "request.timed_out" in events and "request.disconnected" in events
    assert "request.crashed" not in events


async def test_a_client_that_leaves_mid_body_is_logged_as_a_disconnect_at_info_not_a_crash(serve: Serve) -> None:
    port = await serve("")
    with capture_logs() as logs:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /fhir/ehr/notify HTTP/1.1\r\nHost: connector.example.org\r\nAuthorization: "
            + SECRET.encode()
            + b'\r\nContent-Length: 1000\r\n\r\n{"resourceType":'
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        for _ in range(100):
            if any(entry["event"] == "request.disconnected" for entry in logs):
                break
            await asyncio.sleep(0.02)
    left = [entry for entry in logs if entry["event"] == "request.disconnected"]
    assert left and left[0]["log_level"] == "info" and left[0]["endpoint"] == "fhir"
    assert not [entry for entry in logs if entry["log_level"] == "error"]


async def test_a_prompt_client_on_a_kept_alive_connection_is_not_cut_off(serve: Serve) -> None:
    port = await serve("")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(3):  # one connection, several requests, pauses shorter than the timeouts between them
            assert (await client.get("/healthz")).status_code == 200
            await asyncio.sleep(HEADER_TIMEOUT / 2)
