"""Write-back in a real `connector run` process (its scheduled job), against the FHIR test server and the
Paubox sandbox over HTTP: failed writes and a lost answer are tried again by the daemon itself, and a
restart writes nothing twice — one Communication per email."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from connector.sandbox.fhir import FhirState, WriteFault
from connector.sandbox.paubox import SandboxState
from connector.testing import daemon, environment
from tests.conftest import API_KEY, BASIC, Server, write_config
from tests.factories import appointment, marker_patients

pytestmark = pytest.mark.slow


def communications(state: FhirState) -> int:
    return len(state.of_type("Communication"))


def test_the_daemon_writes_one_communication_per_email_through_faults_and_a_restart(
    tmp_path: Path, fhir_state: FhirState, fhir_server: Server, paubox_state: SandboxState, paubox_server: Server
) -> None:
    people = marker_patients()
    fhir_state.load(people)
    start = datetime.now(UTC).replace(microsecond=0)
    for index, person in enumerate(people, start=1):
        fhir_state.put(appointment(f"visit-{index}", person["id"], start + timedelta(days=index)))
    fhir_state.write_faults = [WriteFault(503), WriteFault(500, after_commit=True)]
    config = write_config(
        tmp_path,
        fhir_server.url,
        paubox_server.url,
        mappings=BASIC,
        source={"interval": "1s", "write_back": {"communication": True, "retry_backoff": "100ms"}},
    )
    with daemon(config, env=environment(PAUBOX_API_KEY=API_KEY)) as process:
        process.wait_until(lambda: (communications(fhir_state) == 4 and len(paubox_state.messages) == 4) or None)
        process.stop()
        process.start("restart")
        time.sleep(3)  # three dispatch and write-back runs of the restarted daemon
        assert process.alive()
    assert communications(fhir_state) == 4 and len(paubox_state.messages) == 4
    answered = [w.status for w in fhir_state.writes]
    assert answered.count(503) == 1 and answered.count(500) == 1  # both faults were met and outlived
