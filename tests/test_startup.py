"""Start-up: what `connector run --once` (a cron user's every cycle) imports, and the schema check every start
makes without Alembic; and the daemon's dispatcher, woken by what a poll plans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from connector.errors import LedgerError
from connector.ledger import migrate
from connector.sandbox.fhir import FhirState
from connector.sandbox.paubox import SandboxState
from connector.testing import daemon
from tests.conftest import API_KEY, Server, write_config
from tests.factories import appointment, patient

# Modules a `run --once` without SMTP, SMART, conditions, CRM sources or an HTTP server, and with nothing to
# send, has no use for: `cryptography` (SMART keys, the CRM inbox), Starlette (the CRM receiver), icalendar
# (an .ics attached to a send).
NOT_AT_START = (
    "alembic",
    "apscheduler",
    "aiosmtplib",
    "jwt",
    "fhirpathpy",
    "uvicorn",
    "cryptography",
    "starlette",
    "icalendar",
)

WATCH = """
import atexit, gc, json, sys
atexit.register(lambda: print(json.dumps({
    "modules": sorted({m.split(".")[0] for m in sys.modules}),
    "gc": {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()},
}), file=sys.stderr))
sys.argv = ["connector", *sys.argv[1:]]
from connector.entry import main
main()
"""


def test_run_once_imports_no_module_it_does_not_use(tmp_path: Path, fhir_server: Server, paubox_server: Server) -> None:
    config = write_config(tmp_path, fhir_server.url, paubox_server.url, mappings=("appointment-booked",))

    def watched(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", WATCH, *args, "--config", str(config)],
            cwd=tmp_path,
            env={**os.environ, "PAUBOX_API_KEY": API_KEY},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    upgraded = watched("db", "upgrade")  # as a cron user's ledger: it exists (an empty one is created, by Alembic)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "alembic" in json.loads(upgraded.stderr.strip().splitlines()[-1])["modules"]
    result = watched("run", "--once")
    assert result.returncode == 0, result.stderr
    assert "dispatch: nothing due" in result.stdout
    watched_run = json.loads(result.stderr.strip().splitlines()[-1])
    loaded = set(watched_run["modules"])
    assert "sqlalchemy" in loaded and "connector" in loaded  # the watch works
    assert loaded.isdisjoint(NOT_AT_START), sorted(loaded & set(NOT_AT_START))
    # what the imports created was frozen out of the garbage collector's walks, which run again afterwards
    assert watched_run["gc"]["enabled"] and watched_run["gc"]["frozen"] > 100_000


def test_the_head_read_from_the_scripts_is_alembics() -> None:
    alembic_head = ScriptDirectory.from_config(migrate._alembic()).get_current_head()
    assert migrate.head_revision() == alembic_head
    assert migrate._plain_head() == alembic_head  # the plain reading did not fall back


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_the_schema_check_reads_the_version_table_without_alembic(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}" if backend == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = create_engine(url)
    try:
        assert migrate.current_revision(engine) is None
        migrate.ensure_current(engine)  # an empty database: created
        assert migrate.current_revision(engine) == migrate.head_revision()
        migrate.ensure_current(engine)  # current: nothing to do
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0006'"))
        with pytest.raises(LedgerError, match="at revision 0006 but this version of connector needs"):
            migrate.ensure_current(engine)
    finally:
        engine.dispose()


@pytest.mark.slow
def test_what_a_poll_plans_is_sent_without_waiting_for_the_dispatch_interval(
    tmp_path: Path, fhir_state: FhirState, fhir_server: Server, paubox_state: SandboxState, paubox_server: Server
) -> None:
    config = write_config(
        tmp_path,
        fhir_server.url,
        paubox_server.url,
        mappings=("appointment-booked",),
        source={"interval": "1s", "overlap": "1s", "sweep": "0s"},
        dispatch={"interval": "10m"},
    )
    with daemon(config) as child:
        child.wait_until(lambda: any("_lastUpdated" in r for r in fhir_state.requests), seconds=60)
        time.sleep(1.5)  # the first poll (nothing there) and the first dispatch run are over
        fhir_state.load([patient("p1", "Robin", email="robin@example.org")])
        fhir_state.put(appointment("a1", "p1", datetime.now(UTC) + timedelta(days=3)))
        started = time.monotonic()
        child.wait_until(lambda: len(paubox_state.messages) == 1, seconds=60, interval=0.05)
        assert time.monotonic() - started < 30  # the next dispatch run by its interval is 10 minutes away
