"""The config file: secrets by reference only, errors that name file, line and key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from connector.config import load_config
from connector.errors import ConfigError, InfrastructureError
from connector.units import parse_duration

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """\
sources:
  ehr:
    base_url: https://fhir.example.org/r4
delivery:
  from: appointments@example.org
  paubox:
    username: clinic
    api_key: ${TEST_PAUBOX_KEY}
"""


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [str(p) for p in caught.value.problems]


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "EHR_FHIR_TOKEN",
        "PAUBOX_USERNAME",
        "PAUBOX_API_KEY",
        "PAUBOX_WEBHOOK_TOKEN",
        "EHR_SUBSCRIPTION_SECRET",
    ):
        monkeypatch.setenv(name, "placeholder")
    monkeypatch.setenv("OPTOUT_KEY", "b3B0LW91dCBkaWdlc3Qga2V5IGZvciB0aGUgdGVzdHM=")  # 32 bytes
    config = load_config(ROOT / "config.example.yaml")
    assert config.delivery.paubox.endpoint == "https://api.paubox.net/v1/placeholder"
    assert config.mappings_dir == ROOT / "mappings"
    assert config.reschedule_on == ["start"]


def test_the_commented_crm_section_of_the_example_loads_once_uncommented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CRM sources, their appointment declarations and the inbox, as the example shows them."""
    for name in ("HUBSPOT_CLIENT_SECRET", "HUBSPOT_PRIVATE_APP_TOKEN", "SALESFORCE_PATH_TOKEN"):
        monkeypatch.setenv(name, "placeholder")
    monkeypatch.setenv("INBOX_KEY", "b3B0LW91dCBkaWdlc3Qga2V5IGZvciB0aGUgdGVzdHM=")
    text = (ROOT / "config.example.yaml").read_text()
    crm = text[text.index("# crm:") :].splitlines()
    uncommented = "\n".join(line[2:] for line in crm if line.startswith("# ") or line == "#")
    (tmp_path / "c.yaml").write_text(MINIMAL + uncommented + "\n")
    config = load_config(tmp_path / "c.yaml", needs=[("crm",), ("inbox",)])
    meetings, service = config.crm["hubspot-meetings"].appointment, config.crm["salesforce"].appointment
    assert meetings is not None and meetings.fetch_object and meetings.status.map["CANCELED"] == "cancelled"
    assert service is not None and service.status.map["None"] == "proposed" and service.occurred_at is None


def test_secret_from_environment_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PAUBOX_KEY", "  abc123 \n")
    (tmp_path / "c.yaml").write_text(MINIMAL)
    config = load_config(tmp_path / "c.yaml")
    assert config.delivery.paubox.api_key.get_secret_value() == "abc123"  # trimmed
    assert config.sources["ehr"].overlap == timedelta(minutes=5)
    assert config.ledger_url == f"sqlite:///{tmp_path / 'connector.db'}"


def test_secret_from_file_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "key.txt").write_text("from-file\n")
    (tmp_path / "c.yaml").write_text(MINIMAL.replace("${TEST_PAUBOX_KEY}", "{file: key.txt}"))
    assert load_config(tmp_path / "c.yaml").delivery.paubox.api_key.get_secret_value() == "from-file"


def test_missing_environment_variable_is_named_with_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_PAUBOX_USER", raising=False)
    (tmp_path / "c.yaml").write_text(MINIMAL.replace("username: clinic", "username: ${TEST_PAUBOX_USER}"))
    assert problems(tmp_path / "c.yaml") == [
        f"{tmp_path / 'c.yaml'} line 7 (delivery.paubox.username): environment variable TEST_PAUBOX_USER is not set "
        "(export it, or add it to the env file the service reads)"
    ]


def test_inline_secret_is_refused_without_echoing_it(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(MINIMAL.replace("${TEST_PAUBOX_KEY}", "s3cr3t-inline-value"))
    [problem] = problems(tmp_path / "c.yaml")
    assert "line 8 (delivery.paubox.api_key): secrets must be references" in problem
    assert "s3cr3t" not in problem


def test_every_problem_is_listed_with_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PAUBOX_KEY", "k")
    text = MINIMAL.replace(
        "    base_url: https://fhir.example.org/r4\n",
        "    base_url: https://fhir.example.org/r4\n    pol_interval: 5s\n"
        "    timezone: Mars/Olympus\n    overlap: ten minutes\n",
    )
    (tmp_path / "c.yaml").write_text(text)
    found = problems(tmp_path / "c.yaml")
    assert any("line 4 (sources.ehr.pol_interval): unknown key" in p for p in found)
    assert any("line 5 (sources.ehr.timezone): unknown IANA time zone 'Mars/Olympus'" in p for p in found)
    assert any("line 6 (sources.ehr.overlap): expected a duration" in p for p in found)


def test_a_sweep_that_cannot_cover_the_overlap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PAUBOX_KEY", "k")
    text = MINIMAL.replace(
        "    base_url: https://fhir.example.org/r4\n",
        "    base_url: https://fhir.example.org/r4\n    interval: 5s\n    overlap: 30s\n",
    )
    (tmp_path / "c.yaml").write_text(text)
    [problem] = problems(tmp_path / "c.yaml")
    assert "(sources.ehr): sweep (1m) plus interval (5s) is longer than overlap (30s)" in problem
    (tmp_path / "c.yaml").write_text(text.replace("    overlap: 30s\n", "    overlap: 30s\n    sweep: 0s\n"))
    assert load_config(tmp_path / "c.yaml").sources["ehr"].sweep == timedelta(0)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("sources:\n  ehr: [unclosed\n")
    [problem] = problems(tmp_path / "c.yaml")
    assert "invalid YAML" in problem and "line" in problem


def test_missing_file_is_a_clear_error_saying_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(InfrastructureError) as caught:
        load_config(tmp_path / "absent.yaml")
    assert str(caught.value) == (
        f"the config file {tmp_path / 'absent.yaml'} does not exist: give --config PATH "
        "or set CONNECTOR_CONFIG (config.example.yaml shows every key)"
    )


@pytest.mark.parametrize(
    ("text", "seconds"), [("250ms", 0.25), ("30s", 30), ("5m", 300), ("48h", 172800), ("2d", 172800), (90, 90)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


def test_a_lease_shorter_than_a_send_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PAUBOX_KEY", "k")
    (tmp_path / "c.yaml").write_text(MINIMAL + "dispatch:\n  lease: 20s\n")
    [problem] = problems(tmp_path / "c.yaml")
    assert "dispatch.lease must outlast a send: at least 0:00:45" in problem
