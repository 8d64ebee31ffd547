"""A sweep beside quick polls (connector.intake.polling): the polls of one process share its replica's poll
lock, so that a ping's quick poll is not skipped while this process sweeps, and another replica still is."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from connector.config import load_config
from connector.delivery.paubox import PauboxRestMailer
from connector.models import system_clock
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from connector.testing import migrated_engine
from tests.conftest import API_KEY, BASIC, Gate, write_config
from tests.factories import appointment, patient

SOON = datetime.now(UTC) + timedelta(days=3)


@pytest.mark.postgres
async def test_one_replica_polls_beside_its_own_sweep_and_another_replica_waits_its_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_schema_url: str
) -> None:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    with migrated_engine(pg_schema_url):
        pass
    fhir = FhirState()
    fhir.put(patient("p1", "Robin", email="robin@example.org"))
    for number in range(5):
        fhir.put(appointment(f"a{number}", "p1", SOON + timedelta(hours=number)))
    config = load_config(
        write_config(tmp_path, "http://fhir.test", "https://paubox.test", ledger_url=pg_schema_url, mappings=BASIC)
    )

    def mailer() -> PauboxRestMailer:
        sandbox = SandboxState(api_key=API_KEY, username="clinic")
        return PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(sandbox)))

    gate = Gate(fhir)
    one = Runtime.open(config, system_clock, mailer=mailer(), source_transport=gate)
    two = Runtime.open(config, system_clock, mailer=mailer(), source_transport=httpx.ASGITransport(app=fhir_app(fhir)))
    try:
        assert (await one.poller.poll("ehr")).inserted == 5  # the first poll: a sweep, read to its end
        gate.hold = "offset="  # the sweep's second page
        sweep = asyncio.create_task(one.poller.poll("ehr", sweep=True))
        await asyncio.wait_for(gate.held.wait(), 10)
        fhir.put(appointment("fresh", "p1", SOON + timedelta(days=1)))
        quick = await asyncio.wait_for(one.poller.poll("ehr", quick=True), 10)
        assert not quick.skipped and quick.inserted == 1  # beside the held sweep, under the same lock
        assert (await two.poller.poll("ehr", quick=True)).skipped  # the other replica: not while one polls
        gate.go.set()
        swept = await sweep
        assert not swept.skipped and swept.error is None and swept.inserted == 0  # nothing twice
        after = await two.poller.poll("ehr")
        assert not after.skipped and after.inserted == 0  # released once both polls ended
    finally:
        gate.go.set()
        await one.aclose()
        await two.aclose()
