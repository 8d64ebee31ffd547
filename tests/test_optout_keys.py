"""Opt-out digests keyed with a secret: HMAC-SHA256 under `optout.keys`, unkeyed rows of earlier versions
still honoured and converted by `connector optout rekey` without knowing the values; SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from connector import optout
from connector.config import load_config
from connector.errors import ConfigError, LedgerError
from connector.ledger import migrate
from connector.ledger.engine import OPT, make_engine
from connector.ledger.sql import SqlLedger
from connector.models import system_clock
from connector.optout import OptOutKeys
from connector.runtime import Runtime
from tests.conftest import API_KEY, BASIC, OPTOUT_KEY, OPTOUT_KEYS, write_config

ADDRESS = "Robin.Lee@example.org"
INNER = optout.digest("email", ADDRESS)
SECOND = OptOutKeys({**OPTOUT_KEYS.keys, "t2": os.urandom(32)}, "t2")


def rows(ledger: SqlLedger) -> list[tuple[str, str | None]]:
    with ledger.engine.connect() as conn:
        return [(r.digest, r.key_id) for r in conn.execute(select(OPT).order_by(OPT.c.id))]


def add_unkeyed(ledger: SqlLedger, kind: str, inner: str) -> None:
    """A row as versions before keyed digests wrote it: the plain SHA-256, no key id."""
    with ledger.engine.begin() as conn:
        conn.execute(
            insert(OPT).values(kind=kind, digest=inner, hint="r…@example.org", note=None, created_at=datetime.now(UTC))
        )


def test_an_optout_is_stored_as_an_hmac_under_the_current_key_not_a_plain_sha256(ledger: SqlLedger) -> None:
    assert ledger.optouts.add("email", INNER, optout.hint("email", ADDRESS), None)
    plain = hashlib.sha256(b"email:robin.lee@example.org").hexdigest()
    keyed = hmac.new(OPTOUT_KEYS.keys["t1"], plain.encode(), hashlib.sha256).hexdigest()
    assert rows(ledger) == [(keyed, "t1")]
    assert plain not in str(rows(ledger))
    found = ledger.optouts.opted_out(optout.candidates([], "robin.lee@EXAMPLE.org"))
    assert found is not None and found.key_id == "t1"
    assert not ledger.optouts.add("email", INNER, "x", None)  # already on the list


def test_without_keys_the_list_is_read_but_not_added_to(ledger: SqlLedger) -> None:
    bare = SqlLedger(ledger.engine)
    with pytest.raises(ConfigError, match="openssl rand -base64 32"):
        bare.optouts.add("email", INNER, "x", None)
    add_unkeyed(ledger, "email", INNER)
    assert bare.optouts.opted_out(optout.candidates([], ADDRESS)) is not None


def test_unkeyed_rows_match_until_rekeyed_and_rekey_needs_no_values(ledger: SqlLedger) -> None:
    identifier = optout.digest("identifier", "urn:oid:1.2.3|MRN-1")
    add_unkeyed(ledger, "email", INNER)
    add_unkeyed(ledger, "identifier", identifier)
    assert ledger.optouts.opted_out(optout.candidates([], ADDRESS)) is not None
    result = ledger.optouts.rekey()
    assert (result.converted, result.merged, result.by_key, result.unknown) == (2, 0, {"t1": 2}, {})
    assert {key for _, key in rows(ledger)} == {"t1"} and INNER not in str(rows(ledger))
    assert ledger.optouts.opted_out(optout.candidates([], ADDRESS)) is not None
    assert ledger.optouts.opted_out(optout.candidates(["urn:oid:1.2.3|MRN-1"], None)) is not None
    assert ledger.optouts.opted_out(optout.candidates(["urn:oid:1.2.3|MRN-2"], "other@example.org")) is None
    assert ledger.optouts.rekey().converted == 0  # a second run changes nothing


def test_rekey_merges_an_unkeyed_row_already_present_under_the_key(ledger: SqlLedger) -> None:
    ledger.optouts.add("email", INNER, "r…@example.org", "from the new version")
    add_unkeyed(ledger, "email", INNER)
    result = ledger.optouts.rekey()
    assert (result.converted, result.merged) == (0, 1)
    assert [key for _, key in rows(ledger)] == ["t1"]


def test_a_new_current_key_keys_new_entries_while_the_old_one_still_matches(ledger: SqlLedger) -> None:
    ledger.optouts.add("email", INNER, "x", None)
    rotated = SqlLedger(ledger.engine, SECOND)
    other = optout.digest("email", "sam@example.org")
    assert rotated.optouts.add("email", other, "x", None)
    assert not rotated.optouts.add("email", INNER, "x", None)  # on the list under t1 already
    assert [key for _, key in rows(ledger)] == ["t1", "t2"]
    assert rotated.optouts.opted_out(optout.candidates([], ADDRESS)) is not None
    assert rotated.optouts.opted_out(optout.candidates([], "sam@example.org")) is not None
    assert rotated.optouts.remove("email", INNER) and rotated.optouts.opted_out(optout.candidates([], ADDRESS)) is None


def test_a_daemon_refuses_to_start_when_entries_are_keyed_with_a_key_no_longer_configured(
    tmp_path: Path, api_key_env: str
) -> None:
    config = load_config(write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9", mappings=BASIC))
    runtime_ledger = SqlLedger(make_engine(config.ledger_url), SECOND)
    migrate.upgrade(runtime_ledger.engine)
    runtime_ledger.optouts.add("email", INNER, "x", None)  # keyed with t2, which the config does not list
    runtime_ledger.engine.dispose()
    with pytest.raises(LedgerError, match=r"keyed with t2, which optout\.keys no longer lists"):
        Runtime.open(config, system_clock)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_upgrading_a_ledger_with_plain_digests_then_rekey_keeps_every_optout(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    migrate.upgrade(engine, "0006")  # the schema before keyed digests
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO optout (kind, digest, hint, note, created_at) VALUES "
            f"('email', '{INNER}', 'r…@example.org', NULL, '2026-01-01 00:00:00')"
        )
    migrate.upgrade(engine)
    ledger = SqlLedger(engine, OPTOUT_KEYS)
    assert rows(ledger) == [(INNER, None)]
    assert ledger.optouts.opted_out(optout.candidates([], ADDRESS)) is not None
    assert ledger.optouts.rekey().converted == 1
    assert ledger.optouts.opted_out(optout.candidates([], ADDRESS)) is not None
    assert rows(ledger) == [(OPTOUT_KEYS.keyed(INNER), "t1")]
    engine.dispose()


def connector(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        env={**os.environ, "PAUBOX_API_KEY": API_KEY, "COLUMNS": "400"},
        timeout=120,
    )


def test_cli_add_needs_a_key_and_rekey_converts_what_an_earlier_version_stored(tmp_path: Path) -> None:
    bare = write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9", mappings=BASIC, optout=False)
    refused = connector("optout", "add", "--email", ADDRESS, "--config", str(bare), cwd=tmp_path)
    assert refused.returncode == 2 and "(optout): opt-outs are stored as keyed digests" in refused.stdout
    engine = make_engine(f"sqlite:///{tmp_path / 'connector.db'}")
    migrate.upgrade(engine)
    add_unkeyed(SqlLedger(engine), "email", INNER)
    engine.dispose()
    config = write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    listed = connector("optout", "list", "--config", str(config), cwd=tmp_path)
    assert "none: run `connector optout rekey`" in listed.stdout
    rekeyed = connector("optout", "rekey", "--config", str(config), cwd=tmp_path)
    assert rekeyed.returncode == 0 and "keyed 1 opt-out(s) with 't1'" in rekeyed.stdout, rekeyed.stdout
    assert connector("optout", "remove", "--email", ADDRESS, "--config", str(config), cwd=tmp_path).returncode == 0


def test_hard_bounce_optouts_need_an_optout_key(tmp_path: Path, api_key_env: str) -> None:
    path = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        mappings=BASIC,
        optout=False,
        paubox_extra="    optout_on_hard_bounce: true\n",
    )
    with pytest.raises(ConfigError, match="optout_on_hard_bounce needs `optout:`"):
        load_config(path)


def test_an_optout_key_of_the_wrong_length_is_refused_with_file_line_and_key(tmp_path: Path, api_key_env: str) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9", mappings=BASIC)
    (tmp_path / "optout.key").write_text(base64.b64encode(b"sixteen byte key").decode())
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    text = str(refused.value)
    assert "config.yaml line" in text and "(optout.keys.t1)" in text and "exactly 32 random bytes" in text
    assert OPTOUT_KEY not in text
