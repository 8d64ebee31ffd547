"""The CLI as a user runs it: real processes against the FHIR test server and the Paubox sandbox."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from connector.sandbox.fhir import FhirState
from connector.sandbox.paubox import SandboxState
from connector.testing import cli, daemon
from tests.conftest import BASIC, ROOT, Server, write_config
from tests.factories import MARKER_NAMES, appointment, marker_patients

pytestmark = pytest.mark.slow
START = datetime.now(UTC).replace(microsecond=0)


def phi_markers() -> list[str]:
    return [*MARKER_NAMES, *(p["telecom"][0]["value"] for p in marker_patients())]


@pytest.fixture
def loaded(fhir_state: FhirState) -> FhirState:
    people = marker_patients()
    fhir_state.load(people)
    for index, person in enumerate(people, start=1):
        fhir_state.put(appointment(f"visit-{index}", person["id"], START + timedelta(days=index)))
    # Created already cancelled: nobody was told about it, so no cancellation email either.
    fhir_state.put(appointment("visit-9", "p1", START + timedelta(days=9), status="cancelled"))
    return fhir_state


def test_run_once_twice_then_replay_sends_each_email_once(
    tmp_path: Path, loaded: FhirState, fhir_server: Server, paubox_state: SandboxState, paubox_server: Server
) -> None:
    config = write_config(tmp_path, fhir_server.url, paubox_server.url, mappings=BASIC)
    outputs = []
    first = cli("run", "--once", "--config", str(config), cwd=tmp_path)
    outputs.append(first)
    assert "3 page(s), 5 appointment(s)" in first.stdout
    expected = {f"ehr:appointment-booked:visit-{i}|booked|" for i in range(1, 5)}
    sent_keys = [m["custom_headers"]["X-Notification-Key"] for m in paubox_state.messages]
    assert {k.split("|")[0] + "|" + k.split("|")[1] + "|" for k in sent_keys} == expected
    assert len(sent_keys) == len(set(sent_keys)) == 4

    outputs.append(cli("run", "--once", "--config", str(config), cwd=tmp_path))
    since = (START - timedelta(days=1)).isoformat()
    outputs.append(cli("replay", "--config", str(config), "--since", since, cwd=tmp_path))
    assert len(paubox_state.messages) == 4

    dry = cli("replay", "--config", str(config), "--since", since, "--dry-run", cwd=tmp_path)
    outputs.append(dry)
    assert "would send" not in dry.stdout
    assert dry.stdout.count("suppressed: already sent") == 4
    assert "1 not planned, 4 suppressed" in dry.stdout  # the cancellation: nobody was told of visit-9
    status = cli("status", "--config", str(config), cwd=tmp_path)
    outputs.append(status)
    assert "│ sent      │     4 │" in status.stdout

    for result in outputs:
        for marker in phi_markers():
            assert marker not in result.stderr, f"PHI marker in a log line: {marker}"
            assert marker not in result.stdout, f"PHI marker in command output: {marker}"


def test_sigkill_during_sends_never_sends_a_key_twice(
    tmp_path: Path, loaded: FhirState, fhir_server: Server, paubox_state: SandboxState, paubox_server: Server
) -> None:
    config = write_config(tmp_path, fhir_server.url, paubox_server.url, mappings=BASIC)
    paubox_state.latency = 5.0  # every send hangs in flight for 5 s
    with daemon(config) as child:
        child.wait_until(lambda: paubox_state.received >= 2, seconds=30, interval=0.05)
        child.kill()
    time.sleep(5.5)  # the sandbox finishes the requests it had: Paubox accepted them, we never heard

    paubox_state.latency = 0
    cli("run", "--once", "--config", str(config), cwd=tmp_path)
    cli("run", "--once", "--config", str(config), cwd=tmp_path)
    per_key = paubox_state.requests
    assert all(count == 1 for count in per_key.values()), per_key
    status = cli("status", "--config", str(config), cwd=tmp_path).stdout
    counts = {
        line.split("│")[1].strip(): int(line.split("│")[2])
        for line in status.splitlines()
        if line.startswith("│ ") and line.count("│") == 3
    }
    # Whatever was in flight at the kill is in doubt (and was not sent again); everything else went once.
    # (One in doubt may never have left: committed as `sending`, killed before the request went out.)
    assert counts["in_doubt"] >= 1 and counts["in_doubt"] + counts["sent"] == 4
    assert len(per_key) >= counts["sent"]
    assert "interrupted while sending" in status


def test_sigterm_finishes_in_flight_sends(
    tmp_path: Path, loaded: FhirState, fhir_server: Server, paubox_state: SandboxState, paubox_server: Server
) -> None:
    config = write_config(tmp_path, fhir_server.url, paubox_server.url, mappings=BASIC)
    paubox_state.latency = 1.0
    with daemon(config) as child:
        child.wait_until(lambda: paubox_state.received >= 1, seconds=30, interval=0.05)
        child.terminate()
        assert child.wait(timeout=30) == 0
    status = cli("status", "--config", str(config), cwd=tmp_path).stdout
    assert "│ in_doubt  │     0 │" in status and "│ sending   │     0 │" in status
    assert f"│ sent      │     {paubox_state.received} │" in status


def test_validate_reports_broken_mapping_and_missing_secret(tmp_path: Path) -> None:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    for name in ("appointment-booked.yaml", "appointment-booked.txt", "appointment-booked.html"):
        (mappings / name).write_text((ROOT / "mappings" / name).read_text())
    (mappings / "appointment-booked.txt").write_text("Dear {{ patient_name }\n")
    config = write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    config.write_text(config.read_text().replace(str(ROOT / "mappings"), "mappings"))
    broken = cli("validate", "--config", str(config), cwd=tmp_path, check=False)
    assert broken.returncode == 2
    assert "appointment-booked.txt line 1" in broken.stdout and "template error" in broken.stdout
    env = {k: v for k, v in os.environ.items() if k != "PAUBOX_API_KEY"}
    missing = cli("validate", "--config", str(config), cwd=tmp_path, env=env, check=False)
    assert missing.returncode == 2
    assert "(delivery.paubox.api_key): environment variable PAUBOX_API_KEY is not set" in missing.stdout


def test_a_poison_instant_is_quarantined_shown_and_the_source_moves_on(
    tmp_path: Path, fhir_state: FhirState, fhir_server: Server, paubox_state: SandboxState, paubox_server: Server
) -> None:
    """An appointment whose start is valid FHIR but beyond the calendar in UTC, among good ones: the good
    ones are emailed, the bad one is quarantined and shown by `status` and the dry runs, and what the EHR
    books or corrects afterwards is planned and sent."""
    poison = "9999-12-31T20:00:00-14:00"
    fhir_state.load(marker_patients())
    for index in (1, 2):
        fhir_state.put(appointment(f"visit-{index}", f"p{index}", START + timedelta(days=index)))
    fhir_state.put({**appointment("bad", "p3", START + timedelta(days=5)), "start": poison, "end": poison})
    for index in (3, 4):
        fhir_state.put(appointment(f"visit-{index}", f"p{index}", START + timedelta(days=index)))
    config = write_config(tmp_path, fhir_server.url, paubox_server.url, mappings=BASIC)
    outputs = [cli("run", "--once", "--config", str(config), cwd=tmp_path)]
    assert "5 new version(s), 1 quarantined, 4 new notification(s)" in outputs[0].stdout
    assert len(paubox_state.messages) == 4

    outputs.append(cli("status", "--config", str(config), cwd=tmp_path))
    assert "quarantined (not processed; kept on record): 1 (ehr 1)" in outputs[-1].stdout
    assert "Appointment/bad v1" in outputs[-1].stdout and "Appointment.start is not an" in outputs[-1].stdout
    since = (START - timedelta(days=1)).isoformat()
    outputs.append(cli("replay", "--config", str(config), "--since", since, "--dry-run", cwd=tmp_path))
    assert "quarantined: Appointment/bad v1:" in outputs[-1].stdout and "Appointment/bad v1 " in outputs[-1].stdout
    assert "1 quarantined, 4 suppressed" in outputs[-1].stdout

    fhir_state.put(appointment("bad", "p3", START + timedelta(days=5)))  # corrected: version 2
    fhir_state.put(appointment("visit-5", "p4", START + timedelta(days=6)))  # booked afterwards
    outputs.append(cli("run", "--once", "--dry-run", "--config", str(config), cwd=tmp_path))
    assert outputs[-1].stdout.count("would send (now)") == 2
    outputs.append(cli("run", "--once", "--config", str(config), cwd=tmp_path))
    assert len(paubox_state.messages) == 6
    for result in outputs:
        for marker in phi_markers():
            assert marker not in result.stderr and marker not in result.stdout
