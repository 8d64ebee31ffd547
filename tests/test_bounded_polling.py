"""A hostile FHIR server cannot hold a source forever, fill the memory, or collect its credentials: each
breach fails that poll with a SourceError naming the source, the request and the limit, and other sources
carry on. Real HTTP on 127.0.0.1 against the FHIR test server's hostile modes."""

from __future__ import annotations

import asyncio
import gzip
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from connector import metrics
from connector.config import load_config
from connector.config.sources import FhirPollSourceConfig
from connector.models import system_clock
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sources.bounded import BodyTooLarge, SourceLimitError, capped, fetch
from connector.sources.fhir_poll import FhirPollSource
from connector.sources.smart import SmartAuthError, SmartBackendAuth, SmartLimitError
from tests.conftest import API_KEY, BASIC, ROOT, Server, free_port, write_config
from tests.factories import appointment, patient

START = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
BREACHES = "connector_source_limit_breaches_total"


def load(state: FhirState, appointments: int = 3) -> None:
    state.put(patient("p1", "Robin", email="robin@example.org"))
    for number in range(appointments):
        state.put(appointment(f"a{number}", "p1", START + timedelta(hours=number)))


def hostile(server: Server, **profile: Any) -> None:
    httpx.post(f"{server.url}/_test/faults", json=profile).raise_for_status()


OpenRuntime = Callable[[str], Runtime]


@pytest.fixture
async def open_runtime(
    tmp_path: Path, fhir_server: Server, paubox_server: Server, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[OpenRuntime]:
    """Opens a runtime polling the FHIR test server over HTTP, with these lines added to the source."""
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    opened: list[Runtime] = []

    def open_one(source: str) -> Runtime:
        config = load_config(
            write_config(tmp_path, fhir_server.url, paubox_server.url, mappings=BASIC, extra_source=source)
        )
        opened.append(Runtime.open(config, system_clock))
        return opened[-1]

    yield open_one
    for runtime in opened:
        await runtime.aclose()


async def test_a_next_link_back_to_the_same_page_fails_the_poll_instead_of_looping(
    open_runtime: OpenRuntime, fhir_state: FhirState, fhir_server: Server
) -> None:
    runtime = open_runtime("")
    load(fhir_state)
    hostile(fhir_server, next_loop=True)
    before = metrics.value(BREACHES, source="ehr", limit="next_link_loop")
    report = await asyncio.wait_for(runtime.poller.poll("ehr"), timeout=20)
    assert report.error == (
        "source 'ehr': Appointment search page 1 links back to a page already read in this poll (a loop of next links)"
    )
    assert report.pages == 1 and sum("/Appointment" in r or "/_page" in r for r in fhir_state.requests) == 1
    assert metrics.value(BREACHES, source="ehr", limit="next_link_loop") == before + 1


async def test_endless_invented_pages_stop_at_the_page_limit(
    open_runtime: OpenRuntime, fhir_state: FhirState, fhir_server: Server
) -> None:
    runtime = open_runtime("    limits:\n      max_pages: 5\n")
    load(fhir_state)
    hostile(fhir_server, endless_pages=True)
    report = await asyncio.wait_for(runtime.poller.poll("ehr"), timeout=20)
    assert report.error == (
        "source 'ehr': Appointment search page 5 links to more than 5 pages (sources.ehr.limits.max_pages)"
    )
    assert report.pages == 5 and sum("/Appointment" in r or "/_page" in r for r in fhir_state.requests) == 5
    again = await asyncio.wait_for(runtime.poller.poll("ehr"), timeout=20)
    assert again.error is not None and again.pages == 5  # every poll is bounded, not only the first


async def test_a_slow_drip_fails_within_twice_the_timeout(
    open_runtime: OpenRuntime, fhir_state: FhirState, fhir_server: Server
) -> None:
    """One byte every 0.5 s never trips a timeout between reads; the whole-request deadline does."""
    runtime = open_runtime("    timeout: 2s\n")
    load(fhir_state)
    hostile(fhir_server, drip_seconds=0.5)
    started = time.monotonic()
    report = await asyncio.wait_for(runtime.poller.poll("ehr"), timeout=20)
    elapsed = time.monotonic() - started
    assert report.error == (
        "source 'ehr': Appointment search page 1 did not complete within 2s "
        "(sources.ehr.timeout: connection, headers and the whole body)"
    )
    assert elapsed < 4, f"took {elapsed:.1f} s"


async def test_a_small_search_stops_at_its_page_limit_with_an_error(fhir_state: FhirState, fhir_server: Server) -> None:
    """A patient's Consents spread over endless pages: an error (the notification waits), never a list cut
    short in silence, where a Consent that denies could be on the page not read."""
    hostile(fhir_server, endless_pages=True)
    config = FhirPollSourceConfig(base_url=fhir_server.url, limits={"max_search_pages": 3})
    source = FhirPollSource("ehr", config)
    try:
        with pytest.raises(
            SourceLimitError,
            match=r"Consent search page 3 links to more than 3 pages "
            r"\(sources\.ehr\.limits\.max_search_pages\)",
        ):
            await asyncio.wait_for(source.search("Consent", [("patient", "Patient/p1")]), timeout=20)
    finally:
        await source.aclose()


async def test_a_best_effort_search_reads_only_the_pages_asked_for(fhir_state: FhirState, fhir_server: Server) -> None:
    """`limit_pages` (an `_id` prefetch) stops quietly after that many pages, even on endless ones."""
    hostile(fhir_server, endless_pages=True)
    source = FhirPollSource("ehr", FhirPollSourceConfig(base_url=fhir_server.url, page_size=2))
    try:
        found = await asyncio.wait_for(source.search("Appointment", [("_count", "2")], limit_pages=2), timeout=20)
    finally:
        await source.aclose()
    assert [a["id"] for a in found] == ["invented-0", "invented-1", "invented-2", "invented-3"]
    assert len(fhir_state.requests) == 2


# -- https base, http next link ---------------------------------------------------------------------


class PlainAndTls:
    """One port that speaks TLS (passed through to an https server) and plain HTTP (recorded, answered 404),
    as a host does when http:// and https:// differ only in scheme. Records each plain request's head."""

    def __init__(self, tls_port: int) -> None:
        self.tls_port, self.port, self.plain = tls_port, free_port(), list[bytes]()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> PlainAndTls:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            if conn.recv(1, socket.MSG_PEEK) == b"\x16":  # a TLS handshake
                upstream = socket.create_connection(("127.0.0.1", self.tls_port))
                for a, b in ((conn, upstream), (upstream, conn)):
                    threading.Thread(target=_pipe, args=(a, b), daemon=True).start()
            else:
                head = b""
                while b"\r\n\r\n" not in head and (data := conn.recv(4096)):
                    head += data
                self.plain.append(head)
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                conn.close()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, target):
            end.close()


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[trustme.CA, Path, Path]]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    key_file, cert_file = tmp_path / "key.pem", tmp_path / "cert.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    yield ca, key_file, cert_file


@pytest.mark.parametrize(
    "auth",
    [
        {"type": "bearer", "token": "${TEST_FHIR_SECRET}"},
        {"type": "basic", "username": "connector", "password": "${TEST_FHIR_SECRET}"},
    ],
    ids=["bearer", "basic"],
)
async def test_an_https_source_never_follows_an_http_next_link_with_its_credentials(
    tls: tuple[trustme.CA, Path, Path], auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same host and port, scheme downgraded: the link is refused before any byte goes out in clear."""
    ca, key_file, cert_file = tls
    monkeypatch.setenv("TEST_FHIR_SECRET", "fhir-secret-value")
    state = (
        FhirState(token="fhir-secret-value")
        if auth["type"] == "bearer"
        else FhirState(basic=("connector", "fhir-secret-value"))
    )
    load(state)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    tls_server = Server(fhir_app(state), ssl_keyfile=str(key_file), ssl_certfile=str(cert_file))
    with tls_server as server, PlainAndTls(server.port) as front:
        base = f"https://127.0.0.1:{front.port}"
        state.hostile = state.hostile.from_profile({"next_origin": f"http://127.0.0.1:{front.port}"})
        config = FhirPollSourceConfig(base_url=base, auth=auth, page_size=1)
        source = FhirPollSource("ehr", config, transport=httpx.AsyncHTTPTransport(verify=context))
        pages = []
        try:
            with pytest.raises(SourceLimitError) as refused:
                async for page in source.pages(None):
                    pages.append(page)
        finally:
            await source.aclose()
    assert str(refused.value) == (
        f"source 'ehr': Appointment search page 1 links to http://127.0.0.1:{front.port}, "
        f"not https://127.0.0.1:{front.port}: refusing to send this source's credentials "
        "there"
    )
    assert len(pages) == 1 and len(pages[0].matches) == 1  # the first page, over https, was read
    assert front.plain == []  # nothing, and so no Authorization header, went out over plain http


# -- a huge Bundle, and a healthy source beside it ---------------------------------------------------


def two_sources(folder: Path, hostile_url: str, healthy_url: str, paubox_url: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(f"""\
sources:
  hostile:
    base_url: {hostile_url}
    start_from: 2000-01-01T00:00:00Z
  healthy:
    base_url: {healthy_url}
    start_from: 2000-01-01T00:00:00Z
mappings: {ROOT / "mappings"}
ledger:
  url: sqlite:///connector.db
delivery:
  from: "Example Clinic <appointments@clinic.example.org>"
  paubox:
    base_url: {paubox_url}/v1/clinic
    api_key: ${{PAUBOX_API_KEY}}
""")
    return path


def run_measured(args: list[str], cwd: Path, env: dict[str, str], limit: float) -> tuple[int, int, str]:
    """Run a child to its end; (exit code, peak RSS in KiB of that child alone, stdout + stderr)."""
    output = cwd / "output.txt"
    with output.open("w") as sink:
        child = subprocess.Popen(args, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + limit
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.05)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return child.returncode, usage.ru_maxrss, output.read_text()


@pytest.mark.slow
def test_a_huge_streamed_bundle_fails_that_source_in_bounded_memory_and_the_other_source_sends(
    tmp_path: Path, paubox_state: SandboxState, paubox_server: Server
) -> None:
    """A 200 MB Bundle streamed without a Content-Length: `connector run --once` stops reading it at the
    default max_response_size (32 MiB), its peak RSS stays under 400 MB, and the healthy source beside it is
    polled and its appointment emailed."""
    bad, good = FhirState(), FhirState()
    load(good, appointments=1)
    with Server(fhir_app(bad)) as bad_server, Server(fhir_app(good)) as good_server:
        hostile(bad_server, huge_bundle_mb=200)
        config = two_sources(tmp_path, bad_server.url, good_server.url, paubox_server.url)
        code, peak_kib, output = run_measured(
            [sys.executable, "-m", "connector", "run", "--once", "--config", str(config)],
            tmp_path,
            {**os.environ, "PAUBOX_API_KEY": API_KEY},
            limit=120,
        )
    text = " ".join(output.split())
    print(f"peak RSS of `connector run --once` against a 200 MB Bundle: {peak_kib / 1024:.0f} MiB")
    assert code == 1, output
    assert (
        "source hostile: FAILED source 'hostile': Appointment search page 1: the response is larger than "
        "32.0MiB (sources.hostile.limits.max_response_size); not read further"
    ) in text
    assert "source healthy: 1 page(s), 1 appointment(s)" in text
    assert paubox_state.messages and all(m["recipients"] == ["robin@example.org"] for m in paubox_state.messages)
    assert peak_kib < 400 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"


# -- the bounded read itself, and SMART's requests ----------------------------------------------------


class Trickle(httpx.AsyncByteStream):
    """An endless body of 1 KiB chunks (`pause` seconds apart), counting what the client pulled."""

    def __init__(self, pause: float = 0.0) -> None:
        self.pause, self.pulled = pause, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            self.pulled += 1
            yield b"x" * 1024
            await asyncio.sleep(self.pause)


async def bounded_get(response: httpx.Response, max_bytes: int, deadline: float = 5.0) -> Any:
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(lambda request: response), event_hooks={"response": [capped(max_bytes)]}
    ) as client:
        return await fetch(
            client, client.build_request("GET", "https://fhir.example.org/x"), max_bytes=max_bytes, deadline=deadline
        )


async def test_a_body_is_abandoned_as_soon_as_it_passes_the_limit() -> None:
    body = Trickle()
    with pytest.raises(BodyTooLarge):
        await bounded_get(httpx.Response(200, stream=body), max_bytes=10_000)
    assert body.pulled == 10  # 10 KiB > 10,000 bytes: not one chunk more


async def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    body = Trickle()
    with pytest.raises(BodyTooLarge):
        await bounded_get(httpx.Response(200, headers={"Content-Length": "200000000"}, stream=body), 10_000)
    assert body.pulled == 0


async def test_the_limit_counts_the_body_after_decompression() -> None:
    """200 KB of gzip that inflates to 50 MB is refused at the limit, not inflated in full."""
    compressed = gzip.compress(b"x" * 50_000_000)
    with pytest.raises(BodyTooLarge):
        await bounded_get(httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=compressed), 1_000_000)


async def test_the_deadline_covers_the_whole_body_not_each_read() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await bounded_get(httpx.Response(200, stream=Trickle(pause=0.1)), 10_000_000, deadline=1.0)
    assert time.monotonic() - started < 2


def smart_auth(answer: Callable[[httpx.Request], httpx.Response]) -> SmartBackendAuth:
    key = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return SmartBackendAuth(
        fhir_base_url="https://fhir.example.org/r4",
        client_id="c",
        private_key_pem=key,
        key_id="k",
        transport=httpx.MockTransport(answer),
        max_bytes=64 * 1024,
        source="ehr",
    )


async def test_smart_discovery_is_bounded_like_the_source() -> None:
    padding = "x" * 1_000_000
    auth = smart_auth(
        lambda request: httpx.Response(200, json={"token_endpoint": "https://login.example.org/t", "padding": padding})
    )
    try:
        with pytest.raises(
            SmartLimitError,
            match=r"^source 'ehr': SMART discovery to fhir\.example\.org: the "
            r"answer is larger than 65536 bytes",
        ) as caught:
            await auth.token_endpoint()
        assert caught.value.limit == "max_response_size"
    finally:
        await auth.aclose()


async def test_a_token_endpoint_advertised_over_plain_http_is_refused() -> None:
    auth = smart_auth(lambda request: httpx.Response(200, json={"token_endpoint": "http://login.example.org/t"}))
    try:
        with pytest.raises(SmartAuthError, match="advertised token_endpoint is refused: credentials would cross"):
            await auth.token_endpoint()
    finally:
        await auth.aclose()


async def test_a_huge_401_body_read_by_httpx_before_a_smart_retry_is_capped_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx reads a 401's body itself before the SMART retry; that read is held to the limit as well."""
    key = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    monkeypatch.setenv("TEST_SMART_KEY", key.decode())
    refusal = Trickle()

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return httpx.Response(200, json={"access_token": "t", "token_type": "bearer", "expires_in": 300})
        return httpx.Response(401, stream=refusal)

    config = FhirPollSourceConfig(
        base_url="https://fhir.example.org/r4",
        timeout="10s",
        limits={"max_response_size": "64KiB"},
        auth={
            "type": "smart",
            "client_id": "c",
            "key_id": "k",
            "private_key": "${TEST_SMART_KEY}",
            "token_endpoint": "https://fhir.example.org/token",
        },
    )
    source = FhirPollSource("ehr", config, transport=httpx.MockTransport(server))
    try:
        with pytest.raises(SourceLimitError, match=r"read of Patient/p1: the response is larger than 64\.0KiB"):
            await source.read("Patient", "p1")
    finally:
        await source.aclose()
    assert refusal.pulled == 65  # 65 KiB > 64 KiB: not one chunk more
