"""SIGHUP on a real `connector run`: the mappings and templates are read again, checked first; a broken
folder is logged by file and line and the old mappings keep working; SIGTERM still stops gracefully."""

from __future__ import annotations

import re
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

from connector.sandbox.fhir import FhirState
from connector.testing import appointment, daemon, patient, sandbox_state, serve_fhir, serve_paubox, write_config

BASIC = ("appointment-booked", "appointment-cancelled")


def test_sighup_reloads_mappings_and_keeps_the_old_ones_when_broken(tmp_path: Path) -> None:
    fhir_state, paubox_state = FhirState(), sandbox_state()
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
    fhir_state.load([patient("p1", "Robin", email="robin@example.org"), appointment("a1", "p1", start)])
    with serve_fhir(fhir_state) as fhir, serve_paubox(paubox_state) as paubox:
        config = write_config(tmp_path, fhir.url, paubox.url, mappings=BASIC, source={"interval": "1s"})
        folder = tmp_path / "mappings"
        booked, text = folder / "appointment-booked.yaml", folder / "appointment-booked.txt"
        with daemon(config) as child:
            child.wait_until(lambda: len(paubox_state.messages) == 1)
            assert "Example Clinic" in paubox_state.messages[0]["subject"]

            # Broken: a template that does not compile, and a changed clinic name in the same reload.
            good_text = text.read_text()
            text.write_text(good_text + "\n{% if %}\n")
            booked.write_text(booked.read_text().replace("Example Clinic", "Reloaded Clinic"))
            child.signal(signal.SIGHUP)
            child.wait_until(lambda: "mappings.reload_failed" in child.log_text())
            fhir_state.load([patient("p2", "Sam", email="sam@example.org"), appointment("a2", "p2", start)])
            child.wait_until(lambda: len(paubox_state.messages) == 2)
            assert "Example Clinic" in paubox_state.messages[1]["subject"]  # the old mappings, still whole

            text.write_text(good_text)
            child.signal(signal.SIGHUP)
            child.wait_until(lambda: "mappings.reloaded" in child.log_text())
            fhir_state.load([patient("p3", "Kim", email="kim@example.org"), appointment("a3", "p3", start)])
            child.wait_until(lambda: len(paubox_state.messages) == 3)
            assert "Reloaded Clinic" in paubox_state.messages[2]["subject"]
            assert child.alive()
            assert child.stop() == 0
            log = child.log_text()
    failed = next(line for line in log.splitlines() if "mappings.reload_failed" in line)
    assert re.search(r"appointment-booked\.txt line \d+ \(appointment-booked\.txt\): template error", failed)
    assert "count=1" in failed and "kept=['appointment-booked', 'appointment-cancelled']" in failed
    for name in ("Robin", "Sam", "Kim", "robin@example.org"):  # no patient data in the log
        assert name not in log
    assert "daemon.stopped" in log
