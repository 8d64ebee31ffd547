"""Shared fixtures: real local servers on 127.0.0.1, ledgers on SQLite and PostgreSQL, configs."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import uvicorn
from sqlalchemy.engine import make_url

from connector.ledger import migrate
from connector.ledger.engine import make_engine
from connector.ledger.sql import SqlLedger
from connector.optout import OptOutKeys
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("CONNECTOR_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
API_KEY = "test-sandbox-key"
OPTOUT_KEY = base64.b64encode(b"opt-out digest key for the tests").decode()  # 32 bytes
OPTOUT_KEYS = OptOutKeys({"t1": base64.b64decode(OPTOUT_KEY)}, "t1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """An ASGI app served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error", lifespan="off")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture
def fhir_state() -> FhirState:
    return FhirState()


@pytest.fixture
def fhir_server(fhir_state: FhirState) -> Iterator[Server]:
    with Server(fhir_app(fhir_state)) as server:
        yield server


@pytest.fixture
def paubox_state() -> SandboxState:
    return SandboxState(api_key=API_KEY, username="clinic")


@pytest.fixture
def paubox_server(paubox_state: SandboxState) -> Iterator[Server]:
    with Server(paubox_app(paubox_state)) as server:
        yield server


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A private, empty schema in the `test` database for one test; dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:10]}"
    url = make_url(PG_URL)
    conninfo = f"host={url.host} port={url.port or 5432} dbname={url.database} user={url.username}"
    try:
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is required for the ledger tests and is not reachable at {PG_URL}: "
            f"{type(exc).__name__}. ./scripts/test starts it; or set CONNECTOR_TEST_PG_URL."
        )
    yield str(url.update_query_dict({"options": f"-csearch_path={schema}"}))
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlLedger]:
    """A fresh, migrated ledger on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    migrate.upgrade(engine)
    yield SqlLedger(engine, OPTOUT_KEYS)
    engine.dispose()


BASIC = ("appointment-booked", "appointment-cancelled")


def write_config(
    folder: Path,
    fhir_url: str,
    paubox_url: str,
    *,
    ledger_url: str | None = None,
    extra_source: str = "",
    extra: str = "",
    mappings: tuple[str, ...] | None = None,
    paubox_extra: str = "",
    delivery_extra: str = "",
    optout: bool = True,
) -> Path:
    """A config for the local servers. `mappings`: only these of the shipped mappings (default: all).
    `optout`: with a key for opt-out digests (in a file beside the config)."""
    mappings_dir = ROOT / "mappings"
    if mappings is not None:
        mappings_dir = folder / "mappings"
        shutil.copytree(ROOT / "mappings", mappings_dir)
        for extra_mapping in mappings_dir.glob("*.yaml"):
            if extra_mapping.stem not in mappings:
                extra_mapping.unlink()
    path = folder / "config.yaml"
    path.write_text(f"""\
sources:
  ehr:
    base_url: {fhir_url}
    start_from: 2000-01-01T00:00:00Z
    page_size: 2
    timezone: America/New_York
    retries:
      backoff: 10ms
{extra_source}
mappings: {mappings_dir}
ledger:
  url: {ledger_url or "sqlite:///connector.db"}
delivery:
  from: "Example Clinic <appointments@clinic.example.org>"
{delivery_extra}  paubox:
    base_url: {paubox_url}/v1/clinic
    api_key: ${{PAUBOX_API_KEY}}
{paubox_extra}dispatch:
  interval: 1s
  retry_backoff: 1s
{extra}""")
    if optout:
        (folder / "optout.key").write_text(OPTOUT_KEY)
        with path.open("a") as handle:
            handle.write("optout:\n  keys:\n    t1: {file: optout.key}\n  current: t1\n")
    return path


@pytest.fixture
def api_key_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    return API_KEY
