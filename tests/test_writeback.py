"""EHR write-back: a Communication in the chart for each email Paubox accepted, written by the connector
through the FHIR test server (conditional create on an identifier derived from the notification): one per
email under failed writes, lost answers, restarts, replays and two replicas on PostgreSQL; none for a
skipped notification unless `not_done` is on; refused writes are kept for a person and never hold up an email."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from connector.commands.ledger import status
from connector.config import Config, load_config
from connector.daemon import dispatch, run_once
from connector.delivery.paubox import PauboxRestMailer
from connector.intake.replay import replan
from connector.ledger.engine import WB
from connector.models import State, fixed_clock
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState, WriteFault
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import Fault, SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from connector.writeback import Fact, backoff, communication, identifier_value
from tests.conftest import BASIC, write_config
from tests.factories import appointment, marker_patients, patient

NOW = datetime.now(UTC).replace(microsecond=0)
SYSTEM = "urn:example:connector:notification"
WRITE_BACK = {"communication": True, "identifier_system": SYSTEM, "retry_backoff": "10ms"}

Opener = Callable[..., Runtime]


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
async def opened(tmp_path: Path, fhir: FhirState, paubox: SandboxState, api_key_env: str) -> AsyncIterator[Opener]:
    """Opens runtimes over one ledger (SQLite unless `ledger_url`), all closed at the end."""
    runtimes: list[Runtime] = []

    def open_runtime(write_back: dict[str, Any] | None = None, ledger_url: str | None = None) -> Runtime:
        path = write_config(
            tmp_path,
            "http://fhir.test",
            "https://paubox.test",
            mappings=BASIC,
            ledger_url=ledger_url,
            source={"write_back": WRITE_BACK if write_back is None else write_back},
        )
        config: Config = load_config(path)
        mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
        runtime = Runtime.open(
            config,
            fixed_clock(NOW),
            mailer=mailer,
            source_transport=httpx.ASGITransport(app=fhir_app(fhir)),
            exclusive=ledger_url is None,
        )
        runtimes.append(runtime)
        return runtime

    yield open_runtime
    for runtime in runtimes:
        await runtime.aclose()


async def send_only(runtime: Runtime) -> None:
    """Poll and send, without the write-back that `run_once` does after them."""
    await runtime.poller.poll("ehr")
    await dispatch(runtime)


def communications(fhir: FhirState) -> list[dict[str, Any]]:
    return list(fhir.of_type("Communication"))


def sent_keys(paubox: SandboxState) -> list[str]:
    return sorted(m["custom_headers"]["X-Notification-Key"] for m in paubox.messages)


def by_identifier(fhir: FhirState) -> dict[str, dict[str, Any]]:
    return {c["identifier"][0]["value"]: c for c in communications(fhir)}


async def test_each_accepted_email_gets_one_communication_about_its_appointment(
    opened: Opener, fhir: FhirState, paubox: SandboxState
) -> None:
    runtime = opened()
    await run_once(runtime)
    await run_once(runtime)
    keys = sent_keys(paubox)
    assert len(keys) == 4
    written = by_identifier(fhir)
    assert sorted(written) == sorted(identifier_value("communication", k) for k in keys)
    one = next(c for c in communications(fhir) if c["about"] == [{"reference": "Appointment/a1"}])
    assert one["status"] == "completed"
    assert one["subject"] == {"reference": "Patient/p1"} and one["recipient"] == [{"reference": "Patient/p1"}]
    assert one["identifier"][0]["system"] == SYSTEM
    assert one["medium"][0]["coding"][0]["code"] == "EMAILWRIT"
    assert one["category"][0]["coding"][0]["code"] == "notification"
    assert "payload" not in one and "basedOn" not in one
    assert datetime.fromisoformat(one["sent"]) <= datetime.now(UTC)
    counts = status(runtime.config)["write_back"]
    assert counts == {("communication", "done"): 4}


async def test_no_communication_without_the_switch(opened: Opener, fhir: FhirState, paubox: SandboxState) -> None:
    runtime = opened(write_back={"communication": False})
    await run_once(runtime)
    assert len(paubox.messages) == 4 and communications(fhir) == []


async def test_a_failed_write_and_a_lost_answer_are_tried_again_and_leave_one_each(
    opened: Opener, fhir: FhirState, paubox: SandboxState
) -> None:
    runtime = opened()
    await send_only(runtime)
    # The first write is refused by a 503 (nothing stored), the second is stored but its answer is lost.
    fhir.write_faults = [WriteFault(503), WriteFault(500, after_commit=True)]
    first = await runtime.write_back.run()
    assert first["retry"] == 2 and first["written"] == 2
    assert len(communications(fhir)) == 3  # the lost answer's write is there already
    problems = status(runtime.config)["write_back_problems"]
    assert len(problems) == 2 and all(p.state == "pending" and "HTTP" in (p.reason or "") for p in problems)
    await asyncio.sleep(0.05)  # past the backoff (10 ms, doubled)
    second = await runtime.write_back.run()
    assert second == {"written": 1, "found": 1, "none": 0, "retry": 0, "refused": 0}
    assert len(communications(fhir)) == 4 and len(by_identifier(fhir)) == 4
    assert len(paubox.messages) == 4  # the emails were never held up nor repeated


async def test_a_restart_between_the_send_and_the_write_writes_it_once(
    opened: Opener, fhir: FhirState, paubox: SandboxState
) -> None:
    first = opened()
    await send_only(first)
    fhir.write_faults = [WriteFault(500, after_commit=True)]
    await first.write_back.run()
    await first.aclose()
    second = opened()
    await asyncio.sleep(0.05)
    await run_once(second)
    await run_once(second)
    assert len(paubox.messages) == 4
    assert len(communications(fhir)) == 4 and len(by_identifier(fhir)) == 4


async def test_a_replay_plans_nothing_new_and_writes_nothing_new(
    opened: Opener, fhir: FhirState, paubox: SandboxState
) -> None:
    runtime = opened()
    await run_once(runtime)
    source = runtime.sources["ehr"]
    await replan(runtime.planner, runtime.store.reports, "ehr", source.pages(NOW - timedelta(days=1)), dry_run=False)
    await run_once(runtime)
    assert len(paubox.messages) == 4 and len(communications(fhir)) == 4


@pytest.mark.postgres
async def test_two_replicas_write_one_communication_per_email(
    pg_schema_url: str, opened: Opener, fhir: FhirState, paubox: SandboxState
) -> None:  # the schema first: it is dropped after the replicas are closed
    for index in range(5, 13):  # more work than one claim, so that both replicas take part
        fhir.put(patient(f"p{index}", "Extra", email=f"extra.{index}@example.org"))
        fhir.put(appointment(f"a{index}", f"p{index}", NOW + timedelta(days=1, hours=index)))
    one, two = opened(ledger_url=pg_schema_url), opened(ledger_url=pg_schema_url)
    await asyncio.gather(run_once(one), run_once(two))
    await asyncio.gather(one.write_back.run(), two.write_back.run())
    assert len(paubox.messages) == 12 and len(set(sent_keys(paubox))) == 12
    assert len(communications(fhir)) == 12 and len(by_identifier(fhir)) == 12
    assert status(one.config)["write_back"] == {("communication", "done"): 12}


async def test_a_skipped_notification_is_written_only_when_not_done_is_on(
    opened: Opener, fhir: FhirState, paubox: SandboxState
) -> None:
    fhir.put(patient("p9", "Noaddress"))
    fhir.put(appointment("a9", "p9", NOW + timedelta(days=2)))
    runtime = opened()
    await run_once(runtime)
    assert len(paubox.messages) == 4
    assert [c["status"] for c in communications(fhir)] == ["completed"] * 4
    await runtime.aclose()
    again = opened(write_back={**WRITE_BACK, "not_done": True})
    await run_once(again)
    skipped = [c for c in communications(fhir) if c["status"] == "not-done"]
    assert len(skipped) == 1 and skipped[0]["about"] == [{"reference": "Appointment/a9"}]
    assert "no usable email address" in skipped[0]["statusReason"]["text"] and "sent" not in skipped[0]
    await run_once(again)
    assert len(communications(fhir)) == 5


async def test_a_server_without_conditional_create_is_refused_and_the_email_still_goes(
    opened: Opener, fhir: FhirState, paubox: SandboxState
) -> None:
    fhir.conditional_create = False
    runtime = opened()
    await run_once(runtime)
    assert len(paubox.messages) == 4 and communications(fhir) == []
    data = status(runtime.config)
    assert data["write_back"] == {("communication", "refused"): 4}
    assert all("conditional create" in (p.reason or "") for p in data["write_back_problems"])
    exposition = (await runtime.monitor.exposition()).decode()
    assert 'connector_write_backs{kind="communication",state="refused"} 4.0' in exposition
    assert 'connector_write_backs_total{outcome="refused"} 4.0' in exposition
    assert {n.state for n in data["attention"]} <= {State.FAILED, State.IN_DOUBT} and not data["attention"]


async def test_an_email_in_doubt_is_written_back_once_a_webhook_confirms_it(
    opened: Opener, fhir: FhirState, paubox: SandboxState
) -> None:
    paubox.faults = [Fault(status=500, accept=True)]  # Paubox keeps the first message, the answer is lost
    runtime = opened()
    await run_once(runtime)
    [doubtful] = runtime.ledger.reports.notifications([State.IN_DOUBT], 10)
    assert len(communications(fhir)) == 3  # nothing for the one in doubt
    event = {
        "event_name": "api_mail_log_delivered",
        "payload": {"custom_headers": {"X-Notification-Key": doubtful.key}, "source_tracking_id": "t-1"},
    }
    await runtime.aftercare.webhook(event)
    await run_once(runtime)
    written = by_identifier(fhir)
    assert len(written) == 4 and identifier_value("communication", doubtful.key) in written


def test_the_communication_of_a_reminder_and_of_a_skipped_notification() -> None:
    key = "a1|booked|start-48h|2026-12-10T09:00:00+00:00|p1"
    sent = communication(
        Fact("communication", key, "a1", "p1", datetime(2026, 12, 8, 9, 0, 5, tzinfo=UTC)),
        system=SYSTEM,
        reminder=True,
        topic="Reminder two days before",
    )
    assert sent["category"][0]["coding"][0]["code"] == "reminder" and sent["sent"] == "2026-12-08T09:00:05Z"
    assert sent["topic"] == {"text": "Reminder two days before"}
    value = sent["identifier"][0]["value"]
    assert "|" not in value and value == identifier_value("communication", key)
    skipped = communication(
        Fact("not-done", key, "a1", "p1", None, "Patient/p1 has no usable email address"),
        system=SYSTEM,
        reminder=True,
        topic="Reminder two days before",
    )
    assert skipped["status"] == "not-done" and "sent" not in skipped
    assert skipped["statusReason"] == {"text": "Patient/p1 has no usable email address"}
    assert skipped["identifier"][0]["value"] != value  # a separate resource from a completed one


@pytest.mark.parametrize(("attempts", "expected_s"), [(1, 30), (2, 60), (3, 120), (8, 3600), (100, 3600)])
def test_failed_writes_back_off_doubling_to_the_cap(attempts: int, expected_s: int) -> None:
    assert backoff(attempts, timedelta(seconds=30), timedelta(hours=1)) == timedelta(seconds=expected_s)


async def test_the_topic_is_the_subject_sent_and_the_text_only_where_the_source_asks_for_it(
    opened: Opener, fhir: FhirState, paubox: SandboxState
) -> None:
    runtime = opened(write_back={**WRITE_BACK, "content": "full"})
    await run_once(runtime)
    sent = {m["custom_headers"]["X-Notification-Key"]: m for m in paubox.messages}
    written = by_identifier(fhir)
    for key, message in sent.items():
        one = written[identifier_value("communication", key)]
        assert one["topic"] == {"text": message["subject"]}
        assert one["payload"] == [{"contentString": message["text"]}]
    assert runtime.write_back.sent == {}  # nothing kept once written


async def test_without_content_full_no_text_and_after_a_restart_the_mapping_names_the_topic(
    opened: Opener, fhir: FhirState, paubox: SandboxState
) -> None:
    first = opened(write_back={**WRITE_BACK, "content": "full"})
    await send_only(first)
    await first.aclose()
    again = opened(write_back={**WRITE_BACK, "content": "full"})
    await run_once(again)
    for one in communications(fhir):
        assert one["topic"] == {"text": "Confirmation email when an appointment is booked."}
        assert "payload" not in one and "after a restart" in one["note"][0]["text"]
    await again.aclose()
    plain = opened()
    fhir.put(patient("p7", "Seventh", email="seventh@example.org"))
    fhir.put(appointment("a7", "p7", NOW + timedelta(days=2)))
    await run_once(plain)
    [seventh] = [c for c in communications(fhir) if c["about"] == [{"reference": "Appointment/a7"}]]
    assert (
        "payload" not in seventh and "note" not in seventh and seventh["topic"]["text"].startswith("Your appointment")
    )


async def test_an_identifier_system_with_query_characters_still_finds_the_first_communication(
    opened: Opener, fhir: FhirState, paubox: SandboxState
) -> None:
    # If-None-Exist is a query string: a system with `+`, `&` or `%` must be percent-encoded in it, or the
    # server searches for another system, finds nothing, and a retry puts a second Communication in the chart.
    system = "https://example.org/ids?kind=notification&v=1+2%"
    runtime = opened(write_back={**WRITE_BACK, "identifier_system": system})
    await send_only(runtime)
    fhir.write_faults = [WriteFault(500, after_commit=True)]
    await runtime.write_back.run()
    await asyncio.sleep(0.05)
    second = await runtime.write_back.run()
    assert second["found"] == 1 and second["written"] == 0
    assert len(communications(fhir)) == 4 and len(by_identifier(fhir)) == 4
    assert all(c["identifier"][0]["system"] == system for c in communications(fhir))


async def test_a_slow_ehr_never_gets_a_write_whose_lease_has_run_out(
    opened: Opener, fhir: FhirState, paubox: SandboxState, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write taking longer than the lease would let another replica claim the rest of the batch while
    # this one goes on writing it: two conditional creates of one Communication at once.
    # A lease of 1.5 s (2 min in the product): long enough for a claim on a loaded test machine, where 0.3 s
    # was not; the first write hangs past it.
    monkeypatch.setattr("connector.sending.writeback.LEASE", timedelta(seconds=1.5))
    runtime = opened()
    await send_only(runtime)
    fhir.write_faults = [WriteFault(0, hang=1.8)]  # the first write is slow, the others are not
    leased: list[bool] = []
    write = runtime.write_back._write

    async def checked(job: Any) -> str:
        with runtime.ledger.engine.connect() as conn:
            row = conn.execute(select(WB.c.lease_owner, WB.c.lease_until).where(WB.c.id == job.id)).one()
        until = row.lease_until if row.lease_until.tzinfo else row.lease_until.replace(tzinfo=UTC)
        leased.append(row.lease_owner == runtime.write_back.owner and until > datetime.now(UTC))
        return await write(job)

    monkeypatch.setattr(runtime.write_back, "_write", checked)
    counts = await runtime.write_back.run()
    assert counts["written"] == 4 and len(communications(fhir)) == 4
    assert leased == [True] * 4
