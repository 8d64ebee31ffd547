"""Start-up: what `connector run --once` (a cron user's every cycle) imports, and the schema check every start
makes without Alembic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from connector.errors import LedgerError
from connector.ledger import migrate
from tests.conftest import API_KEY, Server, write_config

# Modules a `run --once` without SMTP, SMART, conditions or an HTTP server has no use for.
NOT_AT_START = ("alembic", "apscheduler", "aiosmtplib", "jwt", "fhirpathpy", "uvicorn")

WATCH = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})), file=sys.stderr))
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
    assert "alembic" in json.loads(upgraded.stderr.strip().splitlines()[-1])
    result = watched("run", "--once")
    assert result.returncode == 0, result.stderr
    assert "dispatch: nothing due" in result.stdout
    loaded = set(json.loads(result.stderr.strip().splitlines()[-1]))
    assert "sqlalchemy" in loaded and "connector" in loaded  # the watch works
    assert loaded.isdisjoint(NOT_AT_START), sorted(loaded & set(NOT_AT_START))


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
