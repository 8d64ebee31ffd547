"""Infrastructure errors that are not bugs: one line on stderr saying what to do, a non-zero exit, and a
traceback only with `--debug`. The CLI runs as a user runs it, in a process of its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import API_KEY, BASIC, free_port, write_config

pytestmark = pytest.mark.slow


def connector(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        env={**os.environ, "PAUBOX_API_KEY": API_KEY, **env},
        timeout=120,
    )


def config_with(tmp_path: Path, ledger_url: str | None = None, extra: str = "") -> Path:
    return write_config(
        tmp_path, "http://127.0.0.1:9/fhir", "http://127.0.0.1:9", ledger_url=ledger_url, mappings=BASIC, extra=extra
    )


@pytest.fixture
def port_in_use() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as held:
        yield held.getsockname()[1]


Case = Callable[[Path, int], tuple[list[str], dict[str, str], str]]
CASES: dict[str, Case] = {
    "ledger unreachable": lambda tmp, _: (
        [
            "status",
            "--config",
            str(config_with(tmp, f"postgresql+psycopg://postgres:s3cret@127.0.0.1:{free_port()}/test")),
        ],
        {},
        "error: cannot reach the ledger at postgresql+psycopg://postgres:***@127.0.0.1:",
    ),
    "ledger unreachable at db upgrade": lambda tmp, _: (
        [
            "db",
            "upgrade",
            "--config",
            str(config_with(tmp, f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test")),
        ],
        {},
        "error: cannot reach the ledger at postgresql+psycopg://postgres@127.0.0.1:",
    ),
    "SQLite folder missing": lambda tmp, _: (
        ["run", "--once", "--config", str(config_with(tmp, f"sqlite:///{tmp}/absent/connector.db"))],
        {},
        f"error: the folder of the SQLite ledger does not exist: {tmp}/absent (ledger.url): create it, or point "
        "ledger.url to an existing folder",
    ),
    "port in use": lambda tmp, port: (
        ["run", "--config", str(config_with(tmp, extra=f"server:\n  port: {port}\n"))],
        {},
        f"error: port {port} on 127.0.0.1 is already in use: stop the process using it, or choose another server.port",
    ),
    "invalid log level": lambda tmp, _: (
        ["--log-level", "verbose", "status", "--config", str(config_with(tmp))],
        {},
        "error: invalid log level 'verbose' (--log-level or CONNECTOR_LOG_LEVEL): use one of debug, info, warning, "
        "error",
    ),
    "invalid log level in the environment": lambda tmp, _: (
        ["status", "--config", str(config_with(tmp))],
        {"CONNECTOR_LOG_LEVEL": "loud"},
        "error: invalid log level 'loud'",
    ),
    "config file missing": lambda tmp, _: (
        ["run", "--once", "--config", str(tmp / "absent.yaml")],
        {},
        f"error: the config file {tmp / 'absent.yaml'} does not exist: give --config PATH or set CONNECTOR_CONFIG",
    ),
    "bounces list: config file missing": lambda tmp, _: (
        ["bounces", "list", "--config", str(tmp / "absent.yaml")],
        {},
        f"error: the config file {tmp / 'absent.yaml'} does not exist: give --config PATH or set CONNECTOR_CONFIG",
    ),
    "bounces clear: ledger unreachable": lambda tmp, _: (
        [
            "bounces",
            "clear",
            "--email",
            "someone@example.org",
            "--config",
            str(config_with(tmp, f"postgresql+psycopg://postgres:s3cret@127.0.0.1:{free_port()}/test")),
        ],
        {},
        "error: cannot reach the ledger at postgresql+psycopg://postgres:***@127.0.0.1:",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_infrastructure_error_is_one_line_saying_what_to_do(case: str, tmp_path: Path, port_in_use: int) -> None:
    args, env, expected = CASES[case](tmp_path, port_in_use)
    result = connector(*args, cwd=tmp_path, **env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("case", ["ledger unreachable", "port in use"])
def test_debug_adds_the_traceback_before_the_same_line(case: str, tmp_path: Path, port_in_use: int) -> None:
    args, env, expected = CASES[case](tmp_path, port_in_use)
    result = connector("--debug", *args, cwd=tmp_path, **env)
    assert result.returncode == 2
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert result.stderr.strip().splitlines()[-1].startswith(expected)
    assert "s3cret" not in result.stderr
