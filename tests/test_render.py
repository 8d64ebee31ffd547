"""`connector render` renders as the daemon would send: the config's time zones, locale and sender, the
mapping's vars, a chosen language variant; its errors are one line naming file and line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import API_KEY, BASIC, write_config
from tests.factories import appointment, patient


def connector(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        env={**os.environ, "PAUBOX_API_KEY": API_KEY, "COLUMNS": "400"},
        timeout=120,
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A deployment folder: config.yaml (source zone America/New_York), its mappings, and a Bundle with an
    appointment at 14:30 UTC on 1 December 2026."""
    write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9", mappings=BASIC)
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": appointment("a1", "p1", datetime(2026, 12, 1, 14, 30, tzinfo=UTC))},
            {"resource": patient("p1", "Robin", email="robin@example.org")},
        ],
    }
    (tmp_path / "bundle.json").write_text(json.dumps(bundle))
    return tmp_path


def test_render_takes_the_zone_and_mappings_from_the_config(folder: Path) -> None:
    result = connector("render", "appointment-booked", "--resource", "bundle.json", cwd=folder)  # config.yaml found
    assert result.returncode == 0, result.stderr
    assert "9:30 AM EST" in result.stdout  # the source's zone, as the daemon sends it
    assert "Example Clinic" in result.stdout  # the mapping's vars
    explicit = connector(
        "render", "appointment-booked", "--resource", "bundle.json", "--config", "config.yaml", cwd=folder
    )
    assert explicit.stdout == result.stdout
    overridden = connector(
        "render", "appointment-booked", "--resource", "bundle.json", "--timezone", "Europe/Amsterdam", cwd=folder
    )
    assert "3:30 PM +0100" in overridden.stdout


def test_render_a_language_variant(folder: Path) -> None:
    dutch = connector("render", "appointment-booked", "--resource", "bundle.json", "--language", "nl", cwd=folder)
    assert dutch.returncode == 0, dutch.stderr
    assert dutch.stdout.startswith("Subject: Uw afspraak bij Example Clinic op 1 december 2026")
    missing = connector("render", "appointment-booked", "--resource", "bundle.json", "--language", "fr", cwd=folder)
    assert missing.returncode == 2
    [line] = missing.stderr.splitlines()
    assert line.startswith("error: ") and "appointment-booked.yaml" in line
    assert "no 'fr' variant of appointment-booked; there are: en, nl" in line


def test_a_template_that_fails_is_one_line_with_file_and_line(folder: Path) -> None:
    html = folder / "mappings" / "appointment-booked.html"
    html.write_text(html.read_text().replace("is confirmed.", "is confirmed. {{ 1 / 0 }}"))
    result = connector("render", "appointment-booked", "--resource", "bundle.json", cwd=folder)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {html.resolve()} line 5: ")
    assert "ZeroDivisionError while rendering" in line and "Traceback" not in result.stderr
    debug = connector("--debug", "render", "appointment-booked", "--resource", "bundle.json", cwd=folder)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_a_template_that_does_not_parse_is_one_line_with_file_and_line(folder: Path) -> None:
    text = folder / "mappings" / "appointment-booked.txt"
    text.write_text("Hello\n{% if %}\n")
    result = connector("render", "appointment-booked", "--resource", "bundle.json", cwd=folder)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {text.resolve()} line 2 (appointment-booked.txt): template error")


def test_render_without_a_config_uses_the_options(tmp_path: Path, folder: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(folder / "bundle.json", elsewhere / "bundle.json")
    result = connector(
        "render",
        "appointment-booked",
        "--resource",
        "bundle.json",
        "--mappings",
        str(folder / "mappings"),
        "--locale",
        "nl_NL",
        cwd=elsewhere,
    )
    assert result.returncode == 0, result.stderr
    assert "on 1 december 2026" in result.stdout and "2:30 p.m. UTC" in result.stdout  # no config: UTC


def test_validate_names_an_unknown_var_with_the_mapping(folder: Path) -> None:
    text = folder / "mappings" / "appointment-booked.txt"
    text.write_text(text.read_text() + "Call {{ vars.clinic_phon }}\n")
    result = connector("validate", "--config", "config.yaml", cwd=folder)
    assert result.returncode == 2
    line = len(text.read_text().splitlines())
    assert f"{text.resolve()} line {line} (appointment-booked.txt): vars.clinic_phon is not in the `vars:` of " in (
        result.stdout
    )
    assert "appointment-booked.yaml" in result.stdout


def test_a_resource_or_patient_file_that_cannot_be_read_is_one_line(folder: Path) -> None:
    missing = connector("render", "appointment-booked", "--resource", "nosuch.json", cwd=folder)
    assert missing.returncode == 2
    [line] = missing.stderr.splitlines()
    assert line.startswith("error: nosuch.json: cannot read the file") and "Traceback" not in missing.stderr
    (folder / "a-folder").mkdir()
    patient_missing = connector(
        "render", "appointment-booked", "--resource", "bundle.json", "--patient", "a-folder", cwd=folder
    )
    assert patient_missing.returncode == 2
    [line] = patient_missing.stderr.splitlines()
    assert line.startswith("error: a-folder: cannot read the file")
    replayed = connector("replay", "--file", "nosuch.json", "--dry-run", cwd=folder)
    assert replayed.returncode == 2 and "nosuch.json: cannot read the file" in replayed.stdout + replayed.stderr
    assert "Traceback" not in replayed.stderr


def test_vars_get_with_a_default_is_not_an_unknown_var(folder: Path) -> None:
    """`vars.get('name', default)` is the way to make a var optional: it renders (the default when the var
    is not defined) and validate takes it, as the daemon did before vars were checked."""
    text = folder / "mappings" / "appointment-booked.txt"
    text.write_text(text.read_text() + "Parking: {{ vars.get('parking', 'ask at the desk') }}\n")
    checked = connector("validate", "--config", "config.yaml", cwd=folder)
    assert checked.returncode == 0, checked.stdout
    rendered = connector("render", "appointment-booked", "--resource", "bundle.json", cwd=folder)
    assert rendered.returncode == 0, rendered.stderr
    assert "Parking: ask at the desk" in rendered.stdout
