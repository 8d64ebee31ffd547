"""Shared fixtures: real local servers on 127.0.0.1, ledgers on SQLite and PostgreSQL, configs.

The tooling itself is the package's harness (`connector.testing`); the names tests import from here
(`Server`, `free_port`, `write_config`, `API_KEY`, …) are that harness's."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from connector.ledger.sql import SqlLedger
from connector.optout import OptOutKeys
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.testing import (
    API_KEY,
    OPTOUT_KEY,
    HarnessError,
    Server,
    free_port,
    migrated_engine,
    pg_schema,
    sandbox_state,
    serve_fhir,
    serve_paubox,
    sqlite_url,
    write_config,
)

__all__ = ["API_KEY", "BASIC", "OPTOUT_KEY", "OPTOUT_KEYS", "ROOT", "Gate", "Server", "free_port", "write_config"]

ROOT = Path(__file__).resolve().parent.parent
OPTOUT_KEYS = OptOutKeys({"t1": base64.b64decode(OPTOUT_KEY)}, "t1")
BASIC = ("appointment-booked", "appointment-cancelled")


class Gate(httpx.AsyncBaseTransport):
    """The FHIR test server, holding the requests whose URL holds `hold` until `go` is set."""

    def __init__(self, fhir: FhirState) -> None:
        self.inner = httpx.ASGITransport(app=fhir_app(fhir))
        self.hold: str | None = None
        self.held, self.go = asyncio.Event(), asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.hold is not None and self.hold in str(request.url):
            self.held.set()
            await self.go.wait()
        return await self.inner.handle_async_request(request)


@pytest.fixture
def fhir_state() -> FhirState:
    return FhirState()


@pytest.fixture
def fhir_server(fhir_state: FhirState) -> Iterator[Server]:
    with serve_fhir(fhir_state) as server:
        yield server


@pytest.fixture
def paubox_state() -> SandboxState:
    return sandbox_state()


@pytest.fixture
def paubox_server(paubox_state: SandboxState) -> Iterator[Server]:
    with serve_paubox(paubox_state) as server:
        yield server


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A private, empty schema in the `test` database for one test; dropped afterwards."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(pg_schema())
        except HarnessError as exc:
            pytest.fail(f"PostgreSQL is required for the ledger tests: {exc}")
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlLedger]:
    """A fresh, migrated ledger on each backend."""
    sqlite = request.param == "sqlite"
    url = sqlite_url(tmp_path / "ledger.db") if sqlite else request.getfixturevalue("pg_schema_url")
    with migrated_engine(url) as engine:
        yield SqlLedger(engine, OPTOUT_KEYS)


@pytest.fixture
def api_key_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    return API_KEY
