"""Secrets only where used: references are read when a command needs them, and missing ones name file,
line and key. `validate` tells what `run` will need (errors) from what a feature that is off would need
(warnings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from connector import config as configuration
from connector.commands import files
from connector.config import LEDGER, load_config
from connector.errors import ConfigError
from tests.conftest import API_KEY, BASIC, write_config

SUBSCRIPTION_OFF = """\
    subscription:
      enabled: false
      secret: ${TEST_SUB_SECRET}
"""


def config_file(tmp_path: Path) -> Path:
    """A config whose Paubox key is ${PAUBOX_API_KEY}, with a disabled subscription (secret
    ${TEST_SUB_SECRET}) and a webhook token (${TEST_WEBHOOK}) while no server is configured."""
    return write_config(
        tmp_path,
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        mappings=BASIC,
        extra_source=SUBSCRIPTION_OFF,
        paubox_extra="    webhook_token: ${TEST_WEBHOOK}\n",
    )


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), start=1) if text in line)


@pytest.fixture(autouse=True)
def _no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PAUBOX_API_KEY", "TEST_SUB_SECRET", "TEST_WEBHOOK", "TEST_LEDGER_URL"):
        monkeypatch.delenv(name, raising=False)


def test_a_missing_secret_is_refused_when_first_used_naming_file_line_and_key(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    config = load_config(path)  # loading reads no secret
    with pytest.raises(ConfigError) as caught:
        config.delivery.paubox.api_key.get_secret_value()
    [problem] = caught.value.problems
    assert (problem.file, problem.line, problem.where) == (path, line_of(path, "api_key:"), "delivery.paubox.api_key")
    assert problem.message == (
        "environment variable PAUBOX_API_KEY is not set (export it, or add it to the env file the service reads)"
    )


def test_a_secret_is_read_on_first_use_then_remembered_and_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "key.txt").write_text("s3cr3t-value\n")
    path = config_file(tmp_path)
    path.write_text(path.read_text().replace("${PAUBOX_API_KEY}", "{file: key.txt}"))
    config = load_config(path)
    secret = config.delivery.paubox.api_key
    assert secret.get_secret_value() == "s3cr3t-value"
    (tmp_path / "key.txt").unlink()
    assert secret.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t" not in repr(config) and "s3cr3t" not in str(config.model_dump())
    monkeypatch.setenv("TEST_EMPTY", " ")
    path.write_text(path.read_text().replace("{file: key.txt}", "${TEST_EMPTY}"))
    with pytest.raises(ConfigError, match="environment variable TEST_EMPTY is empty"):
        load_config(path).delivery.paubox.api_key.get_secret_value()


def test_a_plain_variable_is_needed_only_in_the_parts_a_command_touches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_file(tmp_path)
    path.write_text(
        path.read_text().replace("base_url: http://127.0.0.1:9/v1/clinic", "base_url: ${TEST_PAUBOX_URL}/v1/clinic")
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)  # every part `run` reads
    assert [p.where for p in caught.value.problems] == ["delivery.paubox.base_url"]
    assert load_config(path, LEDGER).ledger_url.endswith("connector.db")  # the ledger commands
    path.write_text(path.read_text().replace("url: sqlite:///connector.db", "url: ${TEST_LEDGER_URL}"))
    with pytest.raises(ConfigError) as caught:
        load_config(path, LEDGER)
    [problem] = caught.value.problems
    assert (problem.where, problem.line) == ("ledger.url", line_of(path, "TEST_LEDGER_URL"))
    monkeypatch.setenv("TEST_PAUBOX_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("TEST_LEDGER_URL", "sqlite:///other.db")
    config = load_config(path)
    assert (config.delivery.paubox.endpoint, config.ledger_url) == (
        "http://127.0.0.1:9/v1/clinic",
        f"sqlite:///{tmp_path / 'other.db'}",
    )


def test_run_needs_every_secret_of_enabled_features_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(config_file(tmp_path))
    assert [p.where for p in configuration.missing(config)] == ["delivery.paubox.api_key"]
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    configuration.require(config)  # the disabled subscription's secret and the unserved webhook token: not needed
    (tmp_path / "other").mkdir()
    enabled = config_file(tmp_path / "other")
    enabled.write_text(enabled.read_text().replace("enabled: false", "enabled: true") + "server:\n  port: 8080\n")
    assert sorted(p.where for p in configuration.missing(load_config(enabled))) == [
        "delivery.paubox.webhook_token",
        "sources.ehr.subscription.secret",
    ]


def test_validate_errors_for_what_run_needs_and_warns_for_features_that_are_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_file(tmp_path)
    assert [p.where for p in files.validate(path).errors] == ["delivery.paubox.api_key"]
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    checked = files.validate(path)
    assert checked.errors == []
    assert [(p.where, p.line) for p in checked.warnings] == [
        ("sources.ehr.subscription.secret", line_of(path, "TEST_SUB_SECRET")),
        ("delivery.paubox.webhook_token", line_of(path, "TEST_WEBHOOK")),
    ]
    assert checked.warnings[0].message == (
        "environment variable TEST_SUB_SECRET is not set; not needed while sources.ehr.subscription.enabled is false"
    )


def test_ledger_commands_run_without_paubox_or_subscription_secrets(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PAUBOX_API_KEY", "TEST_SUB_SECRET", "TEST_WEBHOOK")}

    def connector(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "connector", *args, "--config", str(path)],
            cwd=tmp_path,
            env=env,
            text=True,
            capture_output=True,
            timeout=120,
        )

    for command in (["db", "upgrade"], ["status"], ["optout", "list"]):
        result = connector(*command)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
    validate = connector("validate")
    assert validate.returncode == 2
    assert (
        f"line {line_of(path, 'api_key:')} (delivery.paubox.api_key): environment variable PAUBOX_API_KEY"
        in validate.stdout
    )
    assert "warning:" in validate.stdout and "TEST_SUB_SECRET" in validate.stdout
    run = connector("run", "--once")
    assert (
        run.returncode == 2
        and "(delivery.paubox.api_key): environment variable PAUBOX_API_KEY is not set" in run.stdout
    )
