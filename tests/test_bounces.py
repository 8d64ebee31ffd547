"""Bounces that heal: a hard bounce (or enough soft ones in the window) suppresses that address for that
patient; mail due to it is skipped with the reason (and handed off); when the EHR gives the patient a new
address, reminders go to the new one; an operator can clear a suppression. The pure tally as a table, then
the daemon's parts against the FHIR test server and the Paubox sandbox, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from connector import optout
from connector.bounces import Tally, after_bounce
from connector.commands.run import explain
from connector.config import load_config
from connector.daemon import run_once
from connector.delivery.paubox import PauboxRestMailer
from connector.intake.replay import replan
from connector.models import State
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from tests.conftest import API_KEY, OPTOUT_KEYS, write_config
from tests.factories import appointment, patient

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
WEEK = timedelta(days=7)


def test_a_hard_bounce_suppresses_at_once_and_the_first_reason_stands() -> None:
    tally = after_bounce(None, hard=True, now=T0, soft_limit=3, soft_window=WEEK)
    assert tally.suppressed and tally.reason == "hard bounce" and tally.suppressed_at == T0
    again = after_bounce(tally, hard=False, now=T0 + timedelta(days=1), soft_limit=3, soft_window=WEEK)
    assert again == tally


@pytest.mark.parametrize(
    ("gaps_days", "suppressed"),
    [
        ([0, 1], False),  # two soft bounces: counted, not suppressed
        ([0, 1, 1], True),  # the third within the week: treated as hard
        ([0, 1, 8], False),  # the third after the window: the count starts again
        ([0, 8, 1, 1], True),
    ],
)
def test_soft_bounces_count_within_the_window(gaps_days: list[int], suppressed: bool) -> None:
    tally: Tally | None = None
    now = T0
    for gap in gaps_days:
        now += timedelta(days=gap)
        tally = after_bounce(tally, hard=False, now=now, soft_limit=3, soft_window=WEEK)
    assert tally is not None and tally.suppressed is suppressed
    if suppressed:
        assert tally.reason is not None and "3 soft bounces" in tally.reason


def test_a_bounce_after_an_operator_cleared_it_suppresses_again() -> None:
    cleared = Tally(0, None, T0, "hard bounce", T0 + timedelta(days=1))
    assert not cleared.suppressed
    again = after_bounce(cleared, hard=True, now=T0 + timedelta(days=2), soft_limit=3, soft_window=WEEK)
    assert again.suppressed and again.suppressed_at == T0 + timedelta(days=2)


NOW = datetime.now(UTC).replace(microsecond=0)
OLD, NEW = "old.address@example.org", "new.address@example.org"
MAPPINGS = ("appointment-booked", "appointment-reminder-48h")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def fhir() -> FhirState:
    state = FhirState()
    state.load([patient("p1", "Bouncing", email=OLD)])
    state.put(appointment("a1", "p1", NOW + timedelta(days=3)))
    return state


@pytest.fixture
def paubox() -> SandboxState:
    return SandboxState(api_key="test-sandbox-key", username="clinic")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "sqlite" else str(request.getfixturevalue("pg_schema_url"))


@pytest.fixture
async def opened(
    ledger_url: str | None, tmp_path: Path, fhir: FhirState, paubox: SandboxState, api_key_env: str
) -> AsyncIterator[Callable[..., tuple[Runtime, Clock]]]:
    runtimes: list[Runtime] = []

    def open_runtime(extra: str = "", paubox_extra: str = "") -> tuple[Runtime, Clock]:
        path = write_config(
            tmp_path,
            "http://fhir.test",
            "https://paubox.test",
            mappings=MAPPINGS,
            ledger_url=ledger_url,
            extra=extra,
            paubox_extra=paubox_extra,
        )
        config = load_config(path)
        mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
        clock = Clock(NOW)
        runtime = Runtime.open(config, clock, mailer=mailer, source_transport=httpx.ASGITransport(app=fhir_app(fhir)))
        runtimes.append(runtime)
        return runtime, clock

    yield open_runtime
    for runtime in runtimes:
        await runtime.aclose()


def webhook(key: str, to: str, event: str = "api_mail_log_permanent_failure") -> dict[str, Any]:
    return {
        "event_name": event,
        "payload": {
            "to": to,
            "time": NOW.isoformat(),
            "custom_headers": {"X-Notification-Key": key},
            "source_tracking_id": "tracking-1",
        },
    }


def recipients(paubox: SandboxState) -> list[str]:
    return [r for m in paubox.messages for r in m["recipients"]]


async def booked_and_bounced(runtime: Runtime, paubox: SandboxState, event: str, times: int = 1) -> None:
    await run_once(runtime)
    assert recipients(paubox) == [OLD]
    key = paubox.messages[0]["custom_headers"]["X-Notification-Key"]
    for _ in range(times):
        await runtime.aftercare.webhook(webhook(key, OLD, event))


async def test_a_bounce_then_an_address_change_sends_the_reminder_to_the_new_address(
    opened: Callable[..., tuple[Runtime, Clock]], fhir: FhirState, paubox: SandboxState
) -> None:
    runtime, clock = opened()
    await booked_and_bounced(runtime, paubox, "api_mail_log_permanent_failure")
    [entry] = runtime.ledger.bounces.entries(10)
    assert entry[:4] == ("ehr", "p1", optout.hint("email", OLD), "hard bounce")
    assert OLD not in str(runtime.ledger.bounces.entries(10))  # a masked hint, never the address
    fhir.put(patient("p1", "Bouncing", email=NEW))  # the front desk corrects the address
    clock.now = NOW + timedelta(days=1, hours=1)  # the 48-hour reminder is due
    await run_once(runtime)
    assert recipients(paubox) == [OLD, NEW]


async def test_mail_due_to_a_bounced_address_is_withdrawn_with_the_reason_until_cleared(
    opened: Callable[..., tuple[Runtime, Clock]], paubox: SandboxState
) -> None:
    runtime, clock = opened()
    await booked_and_bounced(runtime, paubox, "api_mail_log_permanent_failure")
    clock.now = NOW + timedelta(days=1, hours=1)
    await run_once(runtime)
    assert recipients(paubox) == [OLD]  # never tried again
    [skipped] = runtime.ledger.reports.notifications([State.SKIPPED], 10)
    assert skipped.mapping == "appointment-reminder-48h" and "bounced (hard bounce" in (skipped.reason or "")
    assert OLD not in (skipped.reason or "")
    inner = optout.digest("email", OLD)
    assert runtime.ledger.bounces.clear([d for _, d in OPTOUT_KEYS.variants(inner)]) == 1
    assert runtime.ledger.bounces.entries(10) == []


async def test_one_query_answers_the_suppression_of_each_send_in_a_batch(
    opened: Callable[..., tuple[Runtime, Clock]], paubox: SandboxState
) -> None:
    """What concurrent sends look up together (connector.ledger.batching) is answered per send: only the
    same source, patient and address, and not once an operator cleared it."""
    runtime, _ = opened()
    await booked_and_bounced(runtime, paubox, "api_mail_log_permanent_failure")
    old = [d for _, d in OPTOUT_KEYS.variants(optout.digest("email", OLD))]
    new = [d for _, d in OPTOUT_KEYS.variants(optout.digest("email", NEW))]
    lookups = [("ehr", "p1", old), ("ehr", "p2", old), ("other", "p1", old), ("ehr", "p1", new), ("ehr", "p1", old)]
    answers = await runtime.store.bounces.suppressed_many(lookups)
    assert [a is not None and a.reason == "hard bounce" for a in answers] == [True, False, False, False, True]
    assert answers[0] == await runtime.store.bounces.suppressed("ehr", "p1", old)
    runtime.ledger.bounces.clear(old)
    assert await runtime.store.bounces.suppressed_many(lookups) == [None] * 5


async def test_soft_bounces_suppress_only_after_the_limit(
    opened: Callable[..., tuple[Runtime, Clock]], paubox: SandboxState
) -> None:
    runtime, clock = opened("bounces:\n  soft_limit: 2\n  soft_window: 3d\n")
    # One message's soft bounce, its webhook delivered three times (Paubox retries a webhook it thinks was
    # lost): one bounce, counted once.
    await booked_and_bounced(runtime, paubox, "api_mail_log_temporary_failure", times=3)
    assert runtime.ledger.bounces.entries(10) == []
    clock.now = NOW + timedelta(days=1, hours=1)
    await run_once(runtime)
    assert recipients(paubox) == [OLD, OLD]  # not suppressed: the reminder goes
    key = paubox.messages[1]["custom_headers"]["X-Notification-Key"]
    await runtime.aftercare.webhook(webhook(key, OLD, "api_mail_log_temporary_failure"))
    [entry] = runtime.ledger.bounces.entries(10)
    assert entry[3] == "2 soft bounces within 72h"


async def test_with_suppression_off_a_bounce_changes_nothing(
    opened: Callable[..., tuple[Runtime, Clock]], paubox: SandboxState
) -> None:
    runtime, clock = opened("bounces:\n  suppress: false\n")
    await booked_and_bounced(runtime, paubox, "api_mail_log_permanent_failure")
    clock.now = NOW + timedelta(days=1, hours=1)
    await run_once(runtime)
    assert recipients(paubox) == [OLD, OLD] and runtime.ledger.bounces.entries(10) == []


async def test_an_operator_lists_and_clears_a_suppression_from_the_command_line(
    opened: Callable[..., tuple[Runtime, Clock]], paubox: SandboxState, tmp_path: Path, ledger_url: str | None
) -> None:
    if ledger_url is not None:
        pytest.skip("the command line is the same on both ledgers")
    runtime, clock = opened()
    await booked_and_bounced(runtime, paubox, "api_mail_log_permanent_failure")
    config = str(runtime.config.path)
    listed = connector("bounces", "list", "-c", config, cwd=tmp_path)
    assert listed.returncode == 0 and "p1" in listed.stdout and optout.hint("email", OLD) in listed.stdout
    assert OLD not in listed.stdout
    status = connector("status", "-c", config, cwd=tmp_path)
    assert "Suppressed after bounces (1)" in status.stdout
    cleared = connector("bounces", "clear", "--email", OLD.upper(), "--patient", "p1", "-c", config, cwd=tmp_path)
    assert cleared.returncode == 0 and "cleared 1 suppression(s)" in cleared.stdout
    clock.now = NOW + timedelta(days=1, hours=1)
    await run_once(runtime)
    assert recipients(paubox) == [OLD, OLD]  # tried again


def connector(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        env={**os.environ, "PAUBOX_API_KEY": API_KEY, "COLUMNS": "400"},
        timeout=120,
    )


async def test_a_reminder_withheld_by_a_bounce_is_handed_off_to_the_front_desk(
    opened: Callable[..., tuple[Runtime, Clock]], fhir: FhirState, paubox: SandboxState
) -> None:
    runtime, clock = opened("handoff:\n  to: task\n  owner: Organization/front-desk\n")
    await booked_and_bounced(runtime, paubox, "api_mail_log_permanent_failure")
    clock.now = NOW + timedelta(days=1, hours=1)
    await run_once(runtime)
    [task] = fhir.of_type("Task")
    assert task["focus"] == {"reference": "Appointment/a1"} and task["for"] == {"reference": "Patient/p1"}
    assert "bounced" in task["description"] and "appointment-reminder-48h" in task["description"]
    assert OLD not in str(task)


async def test_a_dry_run_says_a_new_notification_would_be_skipped_for_the_bounce(
    opened: Callable[..., tuple[Runtime, Clock]], fhir: FhirState, paubox: SandboxState
) -> None:
    runtime, _ = opened()
    await booked_and_bounced(runtime, paubox, "api_mail_log_permanent_failure")
    fhir.put(appointment("a2", "p1", NOW + timedelta(days=5)))
    source = runtime.sources["ehr"]
    replay = await replan(
        runtime.planner, runtime.store.reports, "ehr", source.pages(NOW - timedelta(days=1)), dry_run=True
    )
    verdicts = await explain(runtime, replay.items, NOW)
    new = [item.notification.key for item in replay.items if item.notification.resource_id == "a2"]
    assert len(new) == 2  # the booking confirmation and the 48-hour reminder
    assert all("the chosen address bounced (hard bounce" in verdicts[key] for key in new)


ON_HARD_BOUNCE = "    optout_on_hard_bounce: true\n"
HANDOFF = "handoff:\n  to: task\n  owner: Organization/front-desk\n"


async def test_a_bounce_kept_per_patient_does_not_also_go_on_the_opt_out_list(
    opened: Callable[..., tuple[Runtime, Clock]], fhir: FhirState, paubox: SandboxState
) -> None:
    """With `bounces:` on, `optout_on_hard_bounce` does not add the address to the opt-out list for every
    patient as well: one record, which heals when the EHR gives another address."""
    runtime, clock = opened(HANDOFF, paubox_extra=ON_HARD_BOUNCE)
    await booked_and_bounced(runtime, paubox, "api_mail_log_permanent_failure")
    assert len(runtime.ledger.bounces.entries(10)) == 1 and runtime.ledger.optouts.entries() == []
    clock.now = NOW + timedelta(days=1, hours=1)
    await run_once(runtime)
    await run_once(runtime)
    [skipped] = runtime.ledger.reports.notifications([State.SKIPPED], 10)
    assert "bounced (hard bounce" in (skipped.reason or "")  # one reason, the bounce's
    [task] = fhir.of_type("Task")
    assert "email to the address bounced" in task["description"]
    fhir.put(patient("p1", "Bouncing", email=NEW))
    fhir.put(appointment("a2", "p1", NOW + timedelta(days=4)))
    await run_once(runtime)
    assert recipients(paubox) == [OLD, NEW]  # the new address is written to


async def test_without_suppression_a_hard_bounce_goes_on_the_opt_out_list_and_is_handed_off_as_a_bounce(
    opened: Callable[..., tuple[Runtime, Clock]], fhir: FhirState, paubox: SandboxState
) -> None:
    runtime, clock = opened(HANDOFF + "bounces:\n  suppress: false\n", paubox_extra=ON_HARD_BOUNCE)
    await booked_and_bounced(runtime, paubox, "api_mail_log_permanent_failure")
    assert runtime.ledger.bounces.entries(10) == []
    [entry] = runtime.ledger.optouts.entries()
    assert (entry.kind, entry.category, entry.origin) == ("email", "", "bounce")
    clock.now = NOW + timedelta(days=1, hours=1)
    await run_once(runtime)
    await run_once(runtime)
    [skipped] = runtime.ledger.reports.notifications([State.SKIPPED], 10)
    assert "opted out (by email, bounce," in (skipped.reason or "")
    [task] = fhir.of_type("Task")
    assert "email to the address bounced" in task["description"]  # handed off as the bounce it was
    assert recipients(paubox) == [OLD]


async def test_a_bounce_that_names_no_notification_of_ours_still_goes_on_the_opt_out_list(
    opened: Callable[..., tuple[Runtime, Clock]], paubox: SandboxState
) -> None:
    """Per-patient suppression needs the notification (its patient); without it, `optout_on_hard_bounce`
    is the only record of the bounce."""
    runtime, _ = opened(paubox_extra=ON_HARD_BOUNCE)
    await booked_and_bounced(runtime, paubox, "api_mail_log_permanent_failure")  # ours: suppressed only
    await runtime.aftercare.webhook(webhook("ehr:not-ours|booked", "someone@example.org"))
    assert len(runtime.ledger.bounces.entries(10)) == 1
    [entry] = runtime.ledger.optouts.entries()
    assert entry.origin == "bounce" and entry.hint == optout.hint("email", "someone@example.org")
