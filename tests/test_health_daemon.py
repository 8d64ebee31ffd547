"""`/healthz` of a real `connector run` process: a source whose server stops, a Paubox key that is refused,
a ledger that goes away. Each turns readiness to 503 naming the part, since when and why; recovery turns it
back to 200; `/livez` answers 200 throughout; `connector status` shows the same facts."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.testing import Process, cli, environment
from connector.testing import daemon as connector_daemon
from tests.conftest import API_KEY, BASIC, Server, free_port, write_config
from tests.factories import appointment, marker_patients

pytestmark = pytest.mark.slow


def daemon(config: Path, api_key: str = API_KEY) -> Process:
    """`connector run` with its log in the config's folder; stopped with SIGTERM at the end of the block."""
    return connector_daemon(config, env=environment(PAUBOX_API_KEY=api_key))


def health(port: int, status: int) -> dict[str, Any] | None:
    """The /healthz body when it answers `status`, else None (not listening yet, or another status)."""
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    except httpx.TransportError:
        return None
    assert answer.headers["content-type"] == "application/json"
    return answer.json() if answer.status_code == status else None  # type: ignore[no-any-return]


def polled(body: dict[str, Any] | None) -> dict[str, Any] | None:
    """The body once a poll of source `ehr` has completed."""
    return body if body is not None and "last_success" in body["components"]["source:ehr"] else None


def alive(port: int) -> bool:
    return httpx.get(f"http://127.0.0.1:{port}/livez", timeout=5).status_code == 200


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def status(config: Path, cwd: Path) -> str:
    return cli(
        "status", "--config", str(config), cwd=cwd, env=environment(PAUBOX_API_KEY=API_KEY, COLUMNS="250")
    ).stdout


def health_rows(text: str) -> dict[str, list[str]]:
    """The `Health` table of `connector status`: part → [status, since, detail]."""
    table = text.split("Notifications")[0]
    return {
        cells[0]: cells[1:]
        for line in table.splitlines()
        if line.startswith("│")
        for cells in [[c.strip() for c in line.strip("│").split("│")]]
    }


def since(finding: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(finding["since"])


@pytest.fixture
def loaded(fhir_state: FhirState) -> FhirState:
    people = marker_patients()
    fhir_state.load(people)
    start = datetime.now(UTC).replace(microsecond=0)
    for index, person in enumerate(people, start=1):
        fhir_state.put(appointment(f"visit-{index}", person["id"], start + timedelta(days=index)))
    return fhir_state


def server_section(port: int, health: str = "") -> str:
    return f"server:\n  port: {port}\nhealth:\n  stale_after: 2\n  stale_floor: 1s\n{health}"


def test_a_source_whose_server_stops_turns_healthz_503_naming_it_and_recovery_turns_it_back(
    tmp_path: Path, loaded: FhirState, paubox_server: Server
) -> None:
    port = free_port()
    fhir = Server(fhir_app(loaded)).__enter__()
    config = write_config(
        tmp_path,
        fhir.url,
        paubox_server.url,
        mappings=BASIC,
        extra_source="    interval: 1s\n",
        extra=server_section(port),
    )
    with daemon(config) as process:
        well = process.wait_until(lambda: polled(health(port, 200)))
        assert well["status"] == "ok" and well["failing"] == []
        fhir.__exit__()  # the EHR goes away: every poll fails from now on
        stopped = datetime.now(UTC)
        failing = process.wait_until(lambda: health(port, 503))
        assert failing["status"] == "failing" and failing["failing"] == ["source:ehr"]
        source = failing["components"]["source:ehr"]
        # since its last completed poll (one in flight at the stop may complete just after it)
        assert source["status"] == "failing" and source["since"] == source["last_success"]
        assert since(well["components"]["source:ehr"]) <= since(source) <= stopped + timedelta(seconds=5)
        assert source["reason"].startswith("no poll completed for ") and "(limit 2s); last error: " in source["reason"]
        assert failing["components"]["mailer"]["status"] == "ok" and failing["components"]["ledger"]["status"] == "ok"
        assert alive(port)
        seen = metrics(port)
        assert seen[("connector_ready", ())] == 0
        assert seen[("connector_component_up", (("component", "source:ehr"),))] == 0
        assert seen[("connector_poll_failures_total", (("source", "ehr"),))] >= 1
        rows = health_rows(status(config, tmp_path))
        assert rows["source:ehr"][0] == "FAILING" and "last error: " in rows["source:ehr"][2]
        assert rows["ledger"][0] == "ok"

        with Server(fhir_app(loaded), port=fhir.port):  # the EHR is back on the same address
            recovered = process.wait_until(lambda: health(port, 200))
            assert datetime.fromisoformat(recovered["components"]["source:ehr"]["last_success"]) >= stopped - timedelta(
                seconds=1
            )
            assert alive(port)
            assert health_rows(status(config, tmp_path))["source:ehr"][0] == "ok"


def test_a_refused_paubox_key_turns_healthz_503_naming_the_mailer_until_the_key_works(
    tmp_path: Path, loaded: FhirState, fhir_server: Server, paubox_state: SandboxState, paubox_server: Server
) -> None:
    port = free_port()
    config = write_config(tmp_path, fhir_server.url, paubox_server.url, mappings=BASIC, extra=server_section(port))
    with daemon(config, api_key="a-key-paubox-does-not-know") as process:
        failing = process.wait_until(lambda: health(port, 503))
        assert failing["failing"] == ["mailer"]
        mailer = failing["components"]["mailer"]
        assert mailer["state"] == "blocked" and "401" in mailer["reason"] and "since" in mailer
        assert paubox_state.received >= 1 and paubox_state.messages == []
        assert alive(port)
        assert metrics(port)[("connector_mailer_state", (("state", "blocked"),))] == 1
        rows = health_rows(status(config, tmp_path))
        assert rows["mailer"][0] == "FAILING" and "401" in rows["mailer"][2] and "state: blocked" in rows["mailer"][2]

        paubox_state.api_key = "a-key-paubox-does-not-know"  # the key is fixed: Paubox accepts it now
        process.wait_until(lambda: health(port, 200))
        process.wait_until(lambda: len(paubox_state.messages) == 4)
        assert metrics(port)[("connector_mailer_state", (("state", "running"),))] == 1
        process.wait_until(lambda: health_rows(status(config, tmp_path))["mailer"][0] == "ok")


class TcpProxy:
    """A TCP relay to the PostgreSQL server on a port of its own: `stop()` drops every connection and refuses
    new ones (the database becomes unreachable), `start()` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._open: list[socket.socket] = []
        self._running = False

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        listener.settimeout(0.1)
        self._running = True
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        self._running = False
        time.sleep(0.3)  # the accept loop sees it and closes the listener
        for connection in self._open:
            with_shutdown(connection)
        self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while self._running:
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                upstream = socket.create_connection(self.target)
                self._open += [client, upstream]
                for source, sink in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with_shutdown(sink)


def with_shutdown(connection: socket.socket) -> None:
    with suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    connection.close()


@pytest.mark.postgres
def test_an_unreachable_ledger_turns_healthz_503_and_livez_stays_200(
    tmp_path: Path, pg_schema_url: str, loaded: FhirState, fhir_server: Server, paubox_server: Server
) -> None:
    url = make_url(pg_schema_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.start()
    through_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    port = free_port()
    config = write_config(
        tmp_path,
        fhir_server.url,
        paubox_server.url,
        mappings=BASIC,
        ledger_url=through_proxy,
        extra=server_section(port, "  ledger_timeout: 1s\n"),
    )
    try:
        with daemon(config) as process:
            process.wait_until(lambda: health(port, 200))
            proxy.stop()
            failing = process.wait_until(lambda: health(port, 503))
            assert "ledger" in failing["failing"]
            ledger = failing["components"]["ledger"]
            assert ledger["reason"].startswith("the ledger cannot be read: ") and "since" in ledger
            assert alive(port)
            assert metrics(port)[("connector_component_up", (("component", "ledger"),))] == 0
            proxy.start()
            recovered = process.wait_until(lambda: health(port, 200))
            assert recovered["components"]["ledger"] == {"status": "ok"}
            assert alive(port)
    finally:
        proxy.stop()
