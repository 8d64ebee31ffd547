"""The shipped test harness (`connector.testing`) itself: what its handles promise when things go wrong, and
that what it writes and creates is what the connector reads and what it removes is gone."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import inspect

from connector.config import load_config
from connector.testing import (
    HarnessError,
    Process,
    drop_schema,
    free_port,
    migrated_engine,
    pg_schema,
    serve_fhir,
    sqlite_url,
    write_config,
)
from connector.testing.databases import PG_URL, _conninfo


def python(code: str, log: Path) -> Process:
    return Process([sys.executable, "-c", code], log, name="child")


def test_a_child_that_exits_fails_the_wait_with_its_status_and_the_end_of_its_log(tmp_path: Path) -> None:
    child = python("print('about to fail', flush=True); raise SystemExit(3)", tmp_path / "child.log")
    with child, pytest.raises(HarnessError) as failure:
        child.wait_http(f"http://127.0.0.1:{free_port()}/livez", seconds=20)
    assert "child exited with status 3" in str(failure.value)
    assert "about to fail" in str(failure.value)


def test_a_wait_that_never_comes_true_fails_after_its_time_and_the_child_is_stopped(tmp_path: Path) -> None:
    child = python("import time; time.sleep(60)", tmp_path / "child.log")
    with child, pytest.raises(HarnessError, match="did not get there within 0 s"):
        child.wait_until(lambda: False, seconds=0.3)
    assert not child.alive() and child.returncode == -15  # SIGTERM at the end of the block


def test_kill_then_start_again_restarts_the_child_in_a_marked_section_of_the_same_log(tmp_path: Path) -> None:
    child = python("print('running', flush=True); import time; time.sleep(60)", tmp_path / "child.log")
    with child:
        child.wait_until(lambda: "running" in child.log_text(), seconds=20)
        assert child.kill() == -9
        child.start("restart after SIGKILL")
        child.wait_until(lambda: child.log_text().count("running") == 2, seconds=20)
    log = child.log_text()
    assert log.index("child: start at") < log.index("child: restart after SIGKILL at")


def test_the_fhir_test_server_answers_inside_the_block_and_is_gone_after_it() -> None:
    with serve_fhir() as fhir:
        assert httpx.get(f"{fhir.url}/metadata").json()["resourceType"] == "CapabilityStatement"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{fhir.url}/metadata", timeout=2)


def test_section_keys_replace_defaults_none_removes_one_and_the_connector_reads_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAUBOX_API_KEY", "made-up")
    path = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        ledger_url=sqlite_url(tmp_path / "ledger.db"),
        mappings=("appointment-booked",),
        source={"page_size": 7, "retries": None},
        dispatch={"concurrency": 3, "in_doubt": {"policy": "hold", "wait": "5s"}},
        server={"port": 8099},
    )
    config = load_config(path)
    source = config.sources["ehr"]
    assert source.page_size == 7 and "retries" not in path.read_text()
    assert config.dispatch.concurrency == 3 and config.dispatch.in_doubt.policy == "hold"
    assert config.server is not None and config.server.port == 8099
    assert sorted(p.stem for p in (tmp_path / "mappings").glob("*.yaml")) == ["appointment-booked"]


def test_a_migrated_sqlite_ledger_has_the_notification_table(tmp_path: Path) -> None:
    with migrated_engine(sqlite_url(tmp_path / "ledger.db")) as engine:
        assert "notification" in inspect(engine).get_table_names()


def schema_exists(schema: str) -> bool:
    with psycopg.connect(_conninfo(PG_URL), autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (schema,))
        return found.fetchone() is not None


@pytest.mark.postgres
def test_a_private_schema_holds_the_migrated_ledger_and_is_dropped_at_the_end_unless_kept() -> None:
    with pg_schema(prefix="harness") as url:
        schema = url.rsplit("search_path%3D", 1)[1]
        with migrated_engine(url) as engine:
            assert "notification" in inspect(engine).get_table_names(schema=schema)
        assert schema_exists(schema)
    assert not schema_exists(schema)
    with pg_schema(prefix="harness", keep=True) as url:
        kept = url.rsplit("search_path%3D", 1)[1]
    assert schema_exists(kept)
    drop_schema(kept)
