"""Checks around CRM appointments: a CrmAppointment mapping that can never fire (its CRM source declares no
`appointment:`) is refused by `connector validate` and at start, naming the file and line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from connector.config import load_config
from connector.errors import ConfigError
from connector.runtime import Runtime
from tests.test_crm import crm_env
from tests.test_crm_appointments import HUBSPOT, SALESFORCE, Clock, crm_config


def without(config: Path, *declarations: str) -> None:
    text = config.read_text()
    for declaration in declarations:
        assert declaration in text
        text = text.replace(declaration, "")
    config.write_text(text)


def test_validate_names_a_crm_appointment_mapping_whose_source_declares_no_appointment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crm_env(monkeypatch)
    monkeypatch.setenv("HUBSPOT_TOKEN", "pat-test-token")
    config = crm_config(tmp_path)
    without(config, SALESFORCE)
    booked = tmp_path / "mappings" / "crm-appointment-booked.yaml"
    booked.write_text(booked.read_text().replace("  event: booked\n", "  event: booked\n  sources: [salesforce]\n"))
    result = subprocess.run(
        [sys.executable, "-m", "connector", "validate", "--config", str(config)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        check=False,
    )
    assert result.returncode == 2, result.stdout
    said = " ".join(result.stdout.split())
    assert (
        f"{booked} line 9 (trigger.sources.0): source 'salesforce' has no `appointment:` declaration, so this "
        "CrmAppointment mapping never hears from it: declare one under crm.salesforce.appointment"
    ) in said
    # the mappings that hear from every source still have one that declares appointments (hubspot)
    assert said.count("has no `appointment:` declaration") == 1


def test_a_crm_appointment_mapping_with_no_declaring_source_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crm_env(monkeypatch)
    config = crm_config(tmp_path)
    without(config, SALESFORCE, HUBSPOT)
    with pytest.raises(ConfigError) as caught:
        Runtime.open(load_config(config), Clock())
    problems = [str(p) for p in caught.value.problems]
    assert len(problems) == 5  # the five example CrmAppointment mappings
    assert all(
        "line 7 (trigger.resource): no crm source in the config has an `appointment:` declaration" in p
        for p in problems
    ), problems
