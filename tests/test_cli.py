"""CLI commands that the end-to-end tests do not cover: render, dry run, --now, help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from connector.sandbox.fhir import FhirState
from connector.sandbox.paubox import SandboxState
from tests.conftest import API_KEY, BASIC, ROOT, Server, write_config
from tests.factories import appointment, hl7, patient

START = datetime.now(UTC).replace(microsecond=0)


def connector(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        env={**os.environ, "PAUBOX_API_KEY": API_KEY, "COLUMNS": "400"},
        timeout=120,
    )


def test_render_prints_subject_and_text_and_writes_html(tmp_path: Path) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": appointment("a1", "p1", datetime(2026, 12, 1, 14, 30, tzinfo=UTC))},
            {"resource": patient("p1", "Robin", email="robin@example.org")},
        ],
    }
    (tmp_path / "bundle.json").write_text(json.dumps(bundle))
    result = connector(
        "render",
        "appointment-booked",
        "--resource",
        "bundle.json",
        "--mappings",
        str(ROOT / "mappings"),
        "--timezone",
        "Europe/Amsterdam",
        "--html-out",
        "out.html",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Subject: Your appointment at Example Clinic on December 1, 2026")
    assert "Time:  3:30 PM +0100" in result.stdout  # Babel has no English abbreviation for CET
    assert "<strong>Example Clinic</strong>" in (tmp_path / "out.html").read_text()


def test_render_of_an_invalid_resource_names_the_element(tmp_path: Path) -> None:
    broken = {**hl7("Appointment-example"), "participant": [{"status": 7}]}
    (tmp_path / "a.json").write_text(json.dumps(broken))
    result = connector(
        "render",
        "appointment-booked",
        "--resource",
        "a.json",
        "--patient",
        "a.json",
        "--mappings",
        str(ROOT / "mappings"),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Appointment/example is not valid FHIR R4: check participant.0.status" in result.stderr


def test_dry_run_commits_nothing_and_now_moves_time(
    tmp_path: Path, fhir_state: FhirState, fhir_server: Server, paubox_state: SandboxState, paubox_server: Server
) -> None:
    fhir_state.load(
        [patient("p1", "Robin", email="robin@example.org"), appointment("a1", "p1", START + timedelta(days=2))]
    )
    config = write_config(tmp_path, fhir_server.url, paubox_server.url, mappings=BASIC)
    dry = connector("run", "--dry-run", "--config", str(config), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "would send" in dry.stdout and "1 would send" in dry.stdout
    assert paubox_state.messages == []
    status = connector("status", "--config", str(config), cwd=tmp_path).stdout
    assert "│ pending   │     0 │" in status
    # As if it were three days later: the appointment has started, so nothing goes out.
    later = (START + timedelta(days=3)).isoformat()
    late = connector("run", "--once", "--now", later, "--config", str(config), cwd=tmp_path)
    assert late.returncode == 0, late.stderr
    assert paubox_state.messages == []
    assert "│ skipped   │     1 │" in connector("status", "--config", str(config), cwd=tmp_path).stdout


def test_bearer_auth_reaches_the_fhir_server(
    tmp_path: Path, fhir_state: FhirState, fhir_server: Server, paubox_state: SandboxState, paubox_server: Server
) -> None:
    fhir_state.token = "fhir-test-token"
    fhir_state.load(
        [patient("p1", "Robin", email="robin@example.org"), appointment("a1", "p1", START + timedelta(days=2))]
    )
    auth = "    auth:\n      type: bearer\n      token: ${FHIR_TOKEN}\n"
    config = write_config(tmp_path, fhir_server.url, paubox_server.url, extra_source=auth, mappings=BASIC)
    env = {**os.environ, "PAUBOX_API_KEY": API_KEY}
    denied = subprocess.run(
        [sys.executable, "-m", "connector", "run", "--once", "--config", str(config)],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        env={**env, "FHIR_TOKEN": "wrong"},
    )
    assert denied.returncode == 1 and "HTTP 401" in denied.stdout
    allowed = subprocess.run(
        [sys.executable, "-m", "connector", "run", "--once", "--config", str(config)],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        env={**env, "FHIR_TOKEN": "fhir-test-token"},
    )
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert len(paubox_state.messages) == 1


def test_every_command_has_help(tmp_path: Path) -> None:
    for command in (
        ["run"],
        ["validate"],
        ["render"],
        ["replay"],
        ["status"],
        ["resolve"],
        ["retry"],
        ["db", "upgrade"],
        ["sandbox"],
        ["sandbox", "inbox"],
        ["sandbox", "fhir"],
    ):
        result = connector(*command, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "Usage:" in result.stdout, command


def test_optout_add_list_remove(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9", mappings=BASIC)
    added = connector(
        "optout",
        "add",
        "--email",
        "Robin.Lee@example.org",
        "--note",
        "ticket 42",
        "--config",
        str(config),
        cwd=tmp_path,
    )
    assert added.returncode == 0 and "added: email r…@example.org" in added.stdout
    listed = connector("optout", "list", "--config", str(config), cwd=tmp_path)
    assert "r…@example.org" in listed.stdout and "ticket 42" in listed.stdout
    assert "robin.lee" not in listed.stdout.lower()
    assert (
        connector(
            "optout", "remove", "--email", "robin.lee@EXAMPLE.org", "--config", str(config), cwd=tmp_path
        ).returncode
        == 0
    )
    assert (
        connector(
            "optout", "remove", "--email", "robin.lee@example.org", "--config", str(config), cwd=tmp_path
        ).returncode
        == 1
    )
    bad = connector("optout", "add", "--identifier", "no-system", "--config", str(config), cwd=tmp_path)
    assert bad.returncode == 2 and "SYSTEM|VALUE" in bad.stderr


def test_replay_dry_run_says_why_not(
    tmp_path: Path, fhir_state: FhirState, fhir_server: Server, paubox_state: SandboxState, paubox_server: Server
) -> None:
    fhir_state.load([patient("p1", "Robin"), appointment("a1", "p1", START + timedelta(days=2))])
    config = write_config(tmp_path, fhir_server.url, paubox_server.url, mappings=BASIC)
    dry = connector(
        "replay", "--since", (START - timedelta(days=1)).isoformat(), "--dry-run", "--config", str(config), cwd=tmp_path
    )
    assert dry.returncode == 0, dry.stderr
    assert "skipped: Patient/p1 has no usable email address" in dry.stdout
    assert "1 skipped" in dry.stdout
    assert paubox_state.messages == []


def test_resolve_decides_an_in_doubt_notification(tmp_path: Path, api_key_env: str) -> None:
    from connector.config import load_config
    from connector.ledger.sql import open_ledger
    from connector.models import PlannedNotification, State

    config = write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9", mappings=BASIC)
    ledger = open_ledger(load_config(config))
    ledger.intake.add(
        [
            PlannedNotification(
                key=k,
                source="ehr",
                mapping="m",
                event="booked",
                resource_type="Appointment",
                resource_id=k,
                resource_version="1",
                patient_id="p1",
                due_at=START,
                state=State.IN_DOUBT,
            )
            for k in ("k-sent", "k-again", "k-drop")
        ]
    )
    ledger.engine.dispose()
    for key, flag in (("k-sent", "--sent"), ("k-again", "--resend"), ("k-drop", "--cancel")):
        assert connector("resolve", key, flag, "--config", str(config), cwd=tmp_path).returncode == 0
    assert connector("resolve", "k-sent", "--sent", "--config", str(config), cwd=tmp_path).returncode == 1
    ledger = open_ledger(load_config(config))
    states = {k: r.state for k, r in ledger.reports.existing(["k-sent", "k-again", "k-drop"]).items()}
    ledger.engine.dispose()
    assert states == {"k-sent": State.SENT, "k-again": State.PENDING, "k-drop": State.CANCELLED}
