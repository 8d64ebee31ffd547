"""Poll → plan → ledger → dispatch, in process, against the FHIR test server and the Paubox sandbox."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from connector.config import load_config
from connector.daemon import run_once
from connector.delivery import Outcome
from connector.delivery.gate import GateState
from connector.delivery.paubox import PauboxRestMailer
from connector.intake.replay import replan
from connector.models import Email, PlannedNotification, State, fixed_clock, system_clock
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import Fault, SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from tests.conftest import BASIC, write_config
from tests.factories import appointment, marker_patients, patient

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def fhir() -> FhirState:
    state = FhirState()
    people = marker_patients()
    state.load(people)
    for index, person in enumerate(people, start=1):
        state.put(appointment(f"a{index}", person["id"], NOW + timedelta(days=index)))
    return state


@pytest.fixture
def paubox() -> SandboxState:
    return SandboxState(api_key="test-sandbox-key", username="clinic")


@pytest.fixture
async def runtime(tmp_path: Path, fhir: FhirState, paubox: SandboxState, api_key_env: str) -> AsyncIterator[Runtime]:
    config = load_config(write_config(tmp_path, "http://fhir.test", "https://paubox.test", mappings=BASIC))
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
    rt = Runtime.open(config, fixed_clock(NOW), mailer=mailer, source_transport=httpx.ASGITransport(app=fhir_app(fhir)))
    yield rt
    await rt.aclose()


def keys(paubox: SandboxState) -> list[str]:
    return sorted(m["custom_headers"]["X-Notification-Key"] for m in paubox.messages)


async def test_pages_and_includes_send_each_email_once(runtime: Runtime, fhir: FhirState, paubox: SandboxState) -> None:
    report = await run_once(runtime)
    assert report.polls[0].pages == 2 and report.dispatch is not None and report.dispatch.sent == 4
    assert sorted(m["recipients"][0] for m in paubox.messages) == sorted(
        p["telecom"][0]["value"] for p in marker_patients()
    )
    # Patients came with the search (_include): the dispatcher read nothing more from the server.
    assert not [r for r in fhir.requests if r.startswith("GET /Patient/") or r.startswith("GET /Appointment/")]
    again = await run_once(runtime)
    assert again.polls[0].new_versions == 0 and len(paubox.messages) == 4


async def test_new_version_with_same_status_sends_nothing_new(
    runtime: Runtime, fhir: FhirState, paubox: SandboxState
) -> None:
    await run_once(runtime)
    fhir.put({**fhir.current("Appointment", "a1"), "description": "room changed"})  # type: ignore[dict-item]
    report = await run_once(runtime)
    assert report.polls[0].new_versions == 1 and report.polls[0].inserted == 0
    assert len(paubox.messages) == 4


async def test_cancellation_is_its_own_notification(runtime: Runtime, fhir: FhirState, paubox: SandboxState) -> None:
    await run_once(runtime)
    fhir.put({**fhir.current("Appointment", "a2"), "status": "cancelled"})  # type: ignore[dict-item]
    await run_once(runtime)
    assert len(paubox.messages) == 5
    assert paubox.messages[-1]["subject"].endswith("is cancelled")


async def test_malformed_page_loses_nothing(runtime: Runtime, fhir: FhirState, paubox: SandboxState) -> None:
    fhir.malformed_pages = 1
    fhir.ignore = {"_sort"}  # unsorted: the cursor may only move after the whole traversal
    report = await run_once(runtime)
    assert report.polls[0].error is not None and "not valid JSON" in report.polls[0].error
    start_from = runtime.config.sources["ehr"].start_from
    assert runtime.ledger.intake.cursor("ehr") == start_from + timedelta(minutes=5)  # where the first poll began
    await run_once(runtime)
    assert len(paubox.messages) == 4


async def test_failed_second_page_keeps_the_first_and_the_cursor_is_safe(
    runtime: Runtime, fhir: FhirState, paubox: SandboxState
) -> None:
    fhir.page_status = [200, 503, 503, 503, 503]  # the first page is served, the second fails 4 times
    report = await run_once(runtime)
    assert report.polls[0].error is not None and "HTTP 503" in report.polls[0].error
    first_page_cursor = runtime.ledger.intake.cursor("ehr")
    assert first_page_cursor is not None  # sorted server: the committed first page moved the cursor
    assert len(paubox.messages) == 2
    await run_once(runtime)
    assert len(paubox.messages) == 4


async def test_invalid_resource_is_recorded_and_the_rest_goes_on(
    runtime: Runtime, fhir: FhirState, paubox: SandboxState
) -> None:
    fhir.put({**appointment("bad", "p1", NOW + timedelta(days=3)), "participant": "not-a-list"})
    report = await run_once(runtime)
    assert report.polls[0].quarantined == 1 and len(paubox.messages) == 4
    [(_, seen)] = runtime.ledger.reports.problems(10)
    assert seen.resource_id == "bad" and "not valid FHIR R4" in (seen.problem or "")


async def test_recipients_that_cannot_be_written_to_are_skipped_with_reason(
    runtime: Runtime, fhir: FhirState, paubox: SandboxState
) -> None:
    fhir.put(patient("nomail", "Nobody"))
    fhir.put(patient("gone", "Late", email="late@example.org", deceasedBoolean=True))
    fhir.put(appointment("x1", "nomail", NOW + timedelta(days=1)))
    fhir.put(appointment("x2", "gone", NOW + timedelta(days=1)))
    fhir.put(appointment("x3", "missing", NOW + timedelta(days=1)))
    await run_once(runtime)
    reasons = {r.resource_id: r.reason for r in runtime.ledger.reports.notifications([State.SKIPPED], 10)}
    assert reasons == {
        "x1": "Patient/nomail has no usable email address",
        "x2": "Patient/gone is recorded as deceased",
        "x3": "Patient/missing not found on source 'ehr'",
    }
    assert len(paubox.messages) == 4


async def test_paubox_errors_each_end_in_the_right_state(runtime: Runtime, paubox: SandboxState) -> None:
    paubox.faults = [Fault(status=400), Fault(status=500, accept=True), Fault(status=429, retry_after=60)]
    report = await run_once(runtime)
    counts = runtime.ledger.reports.counts()
    assert (counts[State.SENT], counts[State.FAILED], counts[State.IN_DOUBT], counts[State.PENDING]) == (1, 1, 1, 1)
    assert report.dispatch is not None and report.dispatch.steps["waiting"] == 1  # the 429 waits, unspent
    assert report.dispatch.waiting is not None and "paused" in report.dispatch.waiting
    [failed] = runtime.ledger.reports.notifications([State.FAILED], 10)
    assert failed.reason == "HTTP 400 Bad Request: Fault injected by the sandbox"


async def test_wrong_api_key_pauses_and_keeps_everything_pending(runtime: Runtime, paubox: SandboxState) -> None:
    paubox.api_key = "rotated"
    report = await run_once(runtime)
    assert report.dispatch is not None and report.dispatch.paused is not None
    assert "HTTP 401" in report.dispatch.paused
    assert runtime.ledger.reports.counts()[State.PENDING] == 4
    assert all(r.attempts == 0 for r in runtime.ledger.reports.due(NOW, 10))
    paubox.api_key = "test-sandbox-key"
    await run_once(runtime)
    assert len(paubox.messages) == 4


async def test_replay_sends_nothing_already_sent(runtime: Runtime, paubox: SandboxState) -> None:
    await run_once(runtime)
    source = runtime.sources["ehr"]
    items = (
        await replan(
            runtime.planner, runtime.store.reports, "ehr", source.pages(NOW - timedelta(days=1)), dry_run=False
        )
    ).items
    assert len(items) == 4 and all(i.existing is not None and not i.inserted for i in items)
    await runtime.dispatcher.run()
    assert len(paubox.messages) == 4


async def test_a_flaky_page_is_retried_and_nothing_is_lost(
    runtime: Runtime, fhir: FhirState, paubox: SandboxState
) -> None:
    fhir.page_status = [200, 503, 429]  # the second page fails twice, then is served
    report = await run_once(runtime)
    assert report.polls[0].error is None and len(paubox.messages) == 4


async def test_a_server_that_ignores_last_updated_fails_loudly(
    runtime: Runtime, fhir: FhirState, paubox: SandboxState
) -> None:
    fhir.ignore = {"_lastUpdated"}
    report = await run_once(runtime)
    assert report.polls[0].error is not None and "ignored _lastUpdated" in report.polls[0].error
    assert paubox.messages == []


async def live_runtime(tmp_path: Path, fhir: FhirState, paubox: SandboxState, extra: str) -> Runtime:
    """A runtime on the real clock (the mailer gate's pauses are measured in real seconds)."""
    config = load_config(write_config(tmp_path, "http://fhir.test", "https://paubox.test", mappings=BASIC, extra=extra))
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
    return Runtime.open(config, system_clock, mailer=mailer, source_transport=httpx.ASGITransport(app=fhir_app(fhir)))


async def test_a_short_rate_limit_pause_is_waited_out_in_the_same_run(
    tmp_path: Path, fhir: FhirState, paubox: SandboxState, api_key_env: str
) -> None:
    runtime = await live_runtime(tmp_path, fhir, paubox, "  concurrency: 1\n")
    paubox.faults = [Fault(status=429, retry_after=0.5)]
    try:
        report = await run_once(runtime)
    finally:
        await runtime.aclose()
    assert report.dispatch is not None
    assert (report.dispatch.sent, report.dispatch.steps["waiting"], report.dispatch.waiting) == (4, 1, None)
    assert len(paubox.messages) == 4


async def test_a_hung_request_holds_one_slot_and_nothing_else(
    tmp_path: Path, fhir: FhirState, paubox: SandboxState, api_key_env: str
) -> None:
    # One notification claimed at a time, two in flight: the first send hangs 1.5 s and the other three
    # go meanwhile (a batch did not used to end before its slowest request).
    runtime = await live_runtime(tmp_path, fhir, paubox, "  concurrency: 2\n  batch_size: 1\n")
    paubox.faults = [Fault(hang=1.5, accept=True)]
    try:
        report = await run_once(runtime)
        sent = runtime.ledger.reports.notifications([State.SENT], 10)
    finally:
        await runtime.aclose()
    assert report.dispatch is not None and report.dispatch.sent == 4
    slow = next(n for n in sent if n.key == paubox.messages[0]["custom_headers"]["X-Notification-Key"])
    assert all(n.updated_at < slow.updated_at - timedelta(seconds=1) for n in sent if n is not slow)


async def test_what_the_cache_let_go_is_read_back_in_two_searches(
    runtime: Runtime, fhir: FhirState, paubox: SandboxState
) -> None:
    await runtime.poller.poll("ehr")
    runtime.cache.clear()  # as for a reminder due days after the poll that planned it
    fhir.requests.clear()
    report = await runtime.dispatcher.run()
    assert report.sent == 4
    assert [r.split("?")[0] for r in fhir.requests] == ["GET /Appointment", "GET /Patient"]
    assert all("_id=" in r for r in fhir.requests)


async def test_a_failed_prefetch_falls_back_to_reads(runtime: Runtime, fhir: FhirState, paubox: SandboxState) -> None:
    await runtime.poller.poll("ehr")
    runtime.cache.clear()
    fhir.requests.clear()
    fhir.fail_next = [400, 400]  # both searches refused
    report = await runtime.dispatcher.run()
    assert report.sent == 4
    assert sum(1 for r in fhir.requests if r.startswith(("GET /Appointment/", "GET /Patient/"))) == 8


async def test_a_notification_put_back_does_not_hold_up_the_others(
    tmp_path: Path, fhir: FhirState, paubox: SandboxState, api_key_env: str
) -> None:
    config = load_config(
        write_config(
            tmp_path,
            "http://fhir.test",
            "https://paubox.test",
            mappings=BASIC,
            extra="  batch_size: 2\n  concurrency: 1\n",
        )
    )
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
    runtime = Runtime.open(
        config, fixed_clock(NOW), mailer=mailer, source_transport=httpx.ASGITransport(app=fhir_app(fhir))
    )
    try:
        # Planned for a source no longer configured, more than a batch of them: each is put back, and they
        # stay first in due order.
        runtime.ledger.intake.add(
            [
                PlannedNotification(
                    key=f"old:appointment-booked:x{i}",
                    source="old",
                    mapping="appointment-booked",
                    event="booked",
                    resource_type="Appointment",
                    resource_id=f"x{i}",
                    resource_version="1",
                    patient_id="p",
                    due_at=NOW - timedelta(minutes=1),
                )
                for i in range(3)
            ]
        )
        await runtime.poller.poll("ehr")
        report = await runtime.dispatcher.run()
    finally:
        await runtime.aclose()
    assert (report.sent, report.steps["released"]) == (4, 3)


async def test_a_crash_while_probing_does_not_keep_the_gate_closed(runtime: Runtime, paubox: SandboxState) -> None:
    await runtime.poller.poll("ehr")
    dispatcher, real = runtime.dispatcher, runtime.dispatcher.mailer

    class CrashOnce:
        crashed = False

        async def send(self, email: Email) -> Outcome:
            if not self.crashed:
                self.crashed = True
                raise RuntimeError("unexpected")
            return await real.send(email)

    dispatcher.mailer = CrashOnce()  # type: ignore[assignment]
    dispatcher.gate.state, dispatcher.gate.until = GateState.PAUSED, NOW - timedelta(seconds=1)  # next: a probe
    report = await dispatcher.run()
    # The probe crashed after `sending` was committed (that one waits for a person); the next probe went.
    assert (report.sent, dispatcher.gate.state) == (3, GateState.RUNNING)
    assert runtime.ledger.reports.counts()[State.SENDING] == 1
