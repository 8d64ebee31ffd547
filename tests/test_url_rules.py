"""URL rules at config load and in `connector validate`: credentials never cross a network in clear, URLs
hold no user info, and a database password is never printed."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from connector.config import load_config
from connector.errors import ConfigError
from connector.urls import check_url, masked, scrub

ROOT = Path(__file__).resolve().parent.parent
BASE = """\
sources:
  ehr:
    base_url: {base_url}
{source}delivery:
  from: appointments@example.org
  paubox:
{paubox}    api_key: ${{TEST_KEY}}
{rest}"""
PAUBOX = "    username: clinic\n"
BEARER = "    auth:\n      type: bearer\n      token: ${TEST_KEY}\n"
BASIC = "    auth:\n      type: basic\n      username: connector\n      password: ${TEST_KEY}\n"
SMART = (
    "    auth:\n      type: smart\n      client_id: c\n      key_id: k\n      private_key: ${TEST_KEY}\n"
    "      token_endpoint: TOKEN\n"
)
INBOX = "inbox:\n  keys:\n    k1: ${TEST_INBOX_KEY}\n  current: k1\n"  # base64 of 32 bytes


def config_file(
    tmp_path: Path,
    base_url: str = "https://fhir.example.org/r4",
    source: str = "",
    paubox: str = PAUBOX,
    rest: str = "",
) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(BASE.format(base_url=base_url, source=source, paubox=paubox, rest=rest))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [str(p) for p in caught.value.problems]


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEY", "k-secret-value")
    monkeypatch.setenv("TEST_INBOX_KEY", base64.b64encode(bytes(32)).decode())


@pytest.mark.parametrize("auth", [BEARER, BASIC], ids=["bearer", "basic"])
def test_fhir_credentials_over_plain_http_to_another_host_are_refused(tmp_path: Path, auth: str) -> None:
    path = config_file(tmp_path, "http://fhir.example.org/r4", auth)
    assert problems(path) == [
        f"{path} line 3 (sources.ehr.base_url): credentials would cross the network in "
        "clear to fhir.example.org: use https:// (plain http:// only to 127.0.0.1, ::1 or "
        "localhost)"
    ]


@pytest.mark.parametrize(
    "base_url",
    [
        "http://127.0.0.1:8090",
        "http://127.9.9.9/fhir",
        "http://localhost:8090/r4",
        "http://[::1]:8090",
        "https://fhir.example.org/r4",
    ],
)
def test_fhir_credentials_over_http_to_loopback_or_https_are_accepted(tmp_path: Path, base_url: str) -> None:
    assert load_config(config_file(tmp_path, base_url, BEARER)).sources["ehr"].base_url == base_url.rstrip("/")


def test_plain_http_without_credentials_is_accepted(tmp_path: Path) -> None:
    assert load_config(config_file(tmp_path, "http://fhir.example.org/r4")).sources["ehr"].auth.type == "none"


def test_a_smart_token_endpoint_over_plain_http_is_refused(tmp_path: Path) -> None:
    path = config_file(tmp_path, source=SMART.replace("TOKEN", "http://login.example.org/token"))
    [problem] = problems(path)
    assert problem.startswith(f"{path} line 9 (sources.ehr.auth.token_endpoint): credentials would cross")


def test_hubspot_api_base_over_plain_http_with_a_token_is_refused(tmp_path: Path) -> None:
    crm = (
        "crm:\n  hub:\n    kind: hubspot\n    secret: ${TEST_KEY}\n    api_token: ${TEST_KEY}\n"
        "    api_base: http://api.hubapi.example.org\n" + INBOX
    )
    path = config_file(tmp_path, rest=crm)
    [problem] = problems(path)
    assert problem.startswith(
        f"{path} line 14 (crm.hub.api_base): credentials would cross the network in clear to api.hubapi.example.org"
    )


def test_a_subscription_endpoint_receiving_the_secret_over_plain_http_is_refused(tmp_path: Path) -> None:
    subscription = (
        "    subscription:\n      enabled: true\n      secret: ${TEST_KEY}\n"
        "      endpoint: http://connector.example.org/fhir/ehr/notify\n"
    )
    path = config_file(tmp_path, source=subscription)
    [problem] = problems(path)
    assert problem.startswith(f"{path} line 7 (sources.ehr.subscription.endpoint): credentials would cross")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:x@api.paubox.net/v1/clinic",
        "https://user:pw-secret@api.paubox.net/v1/clinic",
        "http://127.0.0.1\\@api.paubox.net/v1/clinic",
        "http://api.paubox.net/v1/clinic",
    ],
)
def test_a_paubox_base_url_must_be_https_or_loopback_without_user_info(tmp_path: Path, url: str) -> None:
    """`http://127.0.0.1:x@api.paubox.net/…` is a URL to api.paubox.net: the user info does not make it
    local. The refusal never repeats what was before the '@'."""
    path = config_file(tmp_path, paubox=f"    base_url: {url}\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path} line 7 (delivery.paubox.base_url): ")
    assert "pw-secret" not in problem and "127.0.0.1:x" not in problem


def test_a_fhir_base_url_with_user_info_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = config_file(tmp_path, "https://connector:pw-secret@fhir.example.org/r4")
    [problem] = problems(path)
    assert "line 3 (sources.ehr.base_url): a URL may not hold a user name or password" in problem
    assert "pw-secret" not in problem


def test_validate_names_file_line_and_key_for_a_url_refusal(tmp_path: Path) -> None:
    path = config_file(tmp_path, "http://fhir.example.org/r4", BEARER)
    result = subprocess.run(
        [sys.executable, "-m", "connector", "validate", "--config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "TEST_KEY": "k-secret-value"},
        check=False,
    )
    assert result.returncode == 2
    assert f"{path} line 3 (sources.ehr.base_url): credentials would cross the network in clear" in " ".join(
        result.stdout.split()
    )


def test_check_url_reads_the_host_as_the_http_client_does() -> None:
    assert check_url("http://[::1]:8080/x", credentials=True)
    assert check_url("http://127.0.0.1#@evil.example.org/", credentials=True)  # a fragment: the host is local
    with pytest.raises(ValueError, match="user name or password"):
        check_url("http://127.0.0.1%2f@evil.example.org/", credentials=True)
    with pytest.raises(ValueError, match="backslash"):
        check_url("http://evil.example.org\\@127.0.0.1/", credentials=True)


def test_a_database_password_is_masked_and_scrubbed() -> None:
    url = "postgresql+psycopg://connector:pw%40secret@db.example.org/ledger?password=other-secret&sslmode=require"
    shown = masked(url)
    assert "secret" not in shown and shown.startswith("postgresql+psycopg://connector:***@db.example.org/ledger")
    assert scrub("failed for pw@secret, pw%40secret and other-secret", url) == "failed for ***, *** and ***"
    assert masked("sqlite:///connector.db") == "sqlite:///connector.db"


def test_an_unparsable_ledger_url_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = config_file(tmp_path, rest="ledger:\n  url: postgresql+psycopg://u:pw-secret@db.example.org:port/x\n")
    [problem] = problems(path)
    assert "line 10 (ledger.url): not a database URL" in problem and "pw-secret" not in problem


@pytest.mark.parametrize("command", [["status"], ["run", "--once"], ["db", "upgrade"]])
def test_an_unreachable_ledger_never_prints_its_password(tmp_path: Path, command: list[str]) -> None:
    """The driver's error (connection refused) is printed, never the password in ledger.url."""
    rest = (
        f"mappings: {ROOT / 'mappings'}\n"
        "ledger:\n  url: postgresql+psycopg://connector:${TEST_DB_PASSWORD}@127.0.0.1:9/ledger\n"
    )
    path = config_file(tmp_path, "http://127.0.0.1:9/fhir", rest=rest)
    env = {**os.environ, "TEST_KEY": "k", "TEST_DB_PASSWORD": "Db-Pa55word-xyz"}
    result = subprocess.run(
        [sys.executable, "-m", "connector", *command, "--config", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "Db-Pa55word-xyz" not in result.stdout + result.stderr
    assert "refused" in result.stdout + result.stderr  # the driver's text is still there


@pytest.mark.postgres
def test_db_upgrade_names_the_ledger_with_its_password_masked(tmp_path: Path, pg_schema_url: str) -> None:
    """PostgreSQL here trusts local connections, so the password is accepted and ignored; it is never shown."""
    from sqlalchemy.engine import make_url

    url = make_url(pg_schema_url).set(password="Db-Pa55word-xyz")
    rest = f'ledger:\n  url: "{url.render_as_string(hide_password=False)}"\n'
    path = config_file(tmp_path, rest=rest)
    result = subprocess.run(
        [sys.executable, "-m", "connector", "db", "upgrade", "--config", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "TEST_KEY": "k"},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Db-Pa55word-xyz" not in result.stdout + result.stderr
    assert "ledger postgresql+psycopg://postgres:***@127.0.0.1:5432/test" in result.stdout
    assert "schema empty -> " in result.stdout
