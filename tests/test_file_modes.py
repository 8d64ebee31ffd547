"""Files the connector writes are its owner's alone (0600) whatever the umask: the SQLite ledger with its
-wal and -shm files, the lock file, a rendered email. Keys of the wrong length are refused by `validate`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connector.config import load_config
from connector.models import system_clock
from connector.runtime import Runtime
from tests.conftest import API_KEY, BASIC, ROOT, write_config
from tests.factories import appointment, patient


@pytest.fixture(params=[0o022, 0o000])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


async def test_the_sqlite_ledger_its_wal_shm_and_lock_files_are_created_0600(
    tmp_path: Path, umask: int, api_key_env: str
) -> None:
    config = load_config(write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9", mappings=BASIC))
    runtime = Runtime.open(config, system_clock)
    try:
        runtime.ledger.optouts.add("email", "0" * 64, "x", None)  # a write, so that the WAL holds something
        database = tmp_path / "connector.db"
        files = [database, Path(f"{database}-wal"), Path(f"{database}-shm"), Path(f"{database}.lock")]
        assert {f.name: mode(f) for f in files} == {f.name: "0o600" for f in files}
    finally:
        await runtime.aclose()


def connector(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        env={**os.environ, "PAUBOX_API_KEY": API_KEY, "COLUMNS": "400"},
        timeout=120,
    )


def test_a_rendered_email_is_written_0600(tmp_path: Path, umask: int) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": appointment("a1", "p1", datetime(2026, 12, 1, 14, 30, tzinfo=UTC))},
            {"resource": patient("p1", "Robin", email="robin@example.org")},
        ],
    }
    (tmp_path / "bundle.json").write_text(json.dumps(bundle))
    (tmp_path / "out.html").write_text("an older file, readable by all")
    (tmp_path / "out.html").chmod(0o644)
    result = connector(
        "render",
        "appointment-booked",
        "--resource",
        "bundle.json",
        "--mappings",
        str(ROOT / "mappings"),
        "--html-out",
        "out.html",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert mode(tmp_path / "out.html") == "0o600" and "Example Clinic" in (tmp_path / "out.html").read_text()


def test_validate_refuses_an_inbox_key_of_the_wrong_length_naming_file_line_and_key(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        mappings=BASIC,
        extra="inbox:\n  keys:\n    k1: ${INBOX_KEY}\n  current: k1\n",
    )
    short = "c2l4dGVlbiBieXRlIGtleQ=="  # base64 of 16 bytes: an AES-128 key, not the 32 bytes AES-256 needs
    result = subprocess.run(
        [sys.executable, "-m", "connector", "validate", "--config", str(config)],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=120,
        env={**os.environ, "PAUBOX_API_KEY": API_KEY, "INBOX_KEY": short, "COLUMNS": "400"},
    )
    line = config.read_text().splitlines().index("    k1: ${INBOX_KEY}") + 1
    assert result.returncode == 2
    assert f"config.yaml line {line} (inbox.keys.k1): must be base64 of exactly 32 random bytes" in result.stdout
    assert short not in result.stdout + result.stderr
