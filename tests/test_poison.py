"""Poison records: one resource version, deletion or notification that cannot be processed affects that one
only. It is quarantined (or, for a notification, retried a bounded number of times then `failed`) with a
reason naming no data; every other appointment is planned and sent, and the cursor moves past it.

In process, against the FHIR test server and the Paubox sandbox, on SQLite and PostgreSQL ledgers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from connector import metrics
from connector.commands.ledger import status
from connector.config import load_config
from connector.daemon import run_once
from connector.delivery.paubox import PauboxRestMailer
from connector.fhir import parse_instant
from connector.intake import decide
from connector.ledger.sql import SqlLedger
from connector.logs import unsafe
from connector.models import PlannedNotification, State
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from tests.conftest import API_KEY, BASIC, write_config
from tests.factories import appointment, marker_patients

NOW = datetime.now(UTC).replace(microsecond=0)
POISON_START = "9999-12-31T20:00:00-14:00"  # valid FHIR; its UTC time is in the year 10000
HISTORY = "    strategy: history\n"
WINDOW = "    strategy: date-window\n    window:\n      past: 1d\n      future: 14d\n"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


World = Callable[..., Coroutine[Any, Any, Runtime]]


@pytest.fixture
def fhir() -> FhirState:
    state = FhirState()
    state.load(marker_patients())
    return state


@pytest.fixture
def paubox() -> SandboxState:
    return SandboxState(api_key=API_KEY, username="clinic")


@pytest.fixture
async def world(
    tmp_path: Path, ledger: SqlLedger, fhir: FhirState, paubox: SandboxState, api_key_env: str
) -> AsyncIterator[World]:
    """Opens a runtime on the test's ledger (SQLite or PostgreSQL) with the given source settings."""
    opened: list[Runtime] = []

    async def open_runtime(extra_source: str = "", extra: str = "", clock: Clock | None = None) -> Runtime:
        url = ledger.engine.url.render_as_string(hide_password=False)
        config = load_config(
            write_config(
                tmp_path,
                "http://fhir.test",
                "https://paubox.test",
                ledger_url=url,
                mappings=BASIC,
                extra_source=extra_source,
                extra=extra,
            )
        )
        mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
        runtime = Runtime.open(
            config, clock or Clock(NOW), mailer=mailer, source_transport=httpx.ASGITransport(app=fhir_app(fhir))
        )
        opened.append(runtime)
        return runtime

    yield open_runtime
    for runtime in opened:
        await runtime.aclose()


def booked(paubox: SandboxState) -> set[str]:
    """The appointments a booking confirmation was sent for."""
    return {m["custom_headers"]["X-Notification-Key"].split(":")[2].split("|")[0] for m in paubox.messages}


def put_around(fhir: FhirState, poison: dict[str, Any]) -> None:
    """Appointments a1..a4 for the four marker patients, the poison among them (after a2)."""
    for index in (1, 2):
        fhir.put(appointment(f"a{index}", f"p{index}", NOW + timedelta(days=index)))
    fhir.put(poison)
    for index in (3, 4):
        fhir.put(appointment(f"a{index}", f"p{index}", NOW + timedelta(days=index)))


def poisoned(**changes: Any) -> dict[str, Any]:
    return {**appointment("bad", "p1", NOW + timedelta(days=5)), **changes}


@pytest.mark.parametrize("strategy", [pytest.param("", id="last-updated"), pytest.param(HISTORY, id="history")])
async def test_a_poison_instant_is_quarantined_and_the_source_moves_on(
    world: World, fhir: FhirState, paubox: SandboxState, strategy: str
) -> None:
    """The good appointments are emailed, the bad one is quarantined and shown by `connector status`, the
    cursor moves past it, an appointment booked afterwards is planned, and a new version of the bad one with
    a sane date is planned."""
    runtime = await world(strategy)
    counted = metrics.value("connector_quarantined_total", source="ehr")
    put_around(fhir, poisoned(start=POISON_START, end=POISON_START))

    report = await run_once(runtime)
    assert report.polls[0].error is None and report.polls[0].quarantined == 1
    assert booked(paubox) == {"a1", "a2", "a3", "a4"}
    [(source, seen)] = runtime.ledger.reports.problems(10)
    assert (source, seen.resource_id, seen.version) == ("ehr", "bad", "1")
    assert "Appointment.start is not an instant the connector can compute with" in (seen.problem or "")
    shown = status(runtime.config)
    assert shown["quarantined"] == {"ehr": 1} and shown["problems"][0][1].resource_id == "bad"
    bad_updated = parse_instant(fhir.current("Appointment", "bad")["meta"]["lastUpdated"])  # type: ignore[index]
    cursor = runtime.ledger.intake.cursor("ehr")
    assert cursor is not None and bad_updated is not None and cursor >= bad_updated

    fhir.put(appointment("a5", "p2", NOW + timedelta(days=6)))  # booked after the poison
    await run_once(runtime)
    assert "a5" in booked(paubox)
    fhir.put(poisoned())  # the EHR corrects the date: version 2 is tried again
    await run_once(runtime)
    assert booked(paubox) == {"a1", "a2", "a3", "a4", "a5", "bad"}
    assert runtime.ledger.reports.quarantined() == {"ehr": 1}  # version 1 stays quarantined
    assert metrics.value("connector_quarantined_total", source="ehr") == counted + 1  # logged and counted once


MANY_PATIENTS = [{"actor": {"reference": f"Patient/p{i:02d}{'x' * 60}"}, "status": "accepted"} for i in range(40)]
MODIFIER = [
    {
        "actor": {"reference": "Patient/p1"},
        "status": "accepted",
        "modifierExtension": [{"url": "http://example.org/fhir/not-really", "valueBoolean": True}],
    }
]
POISONS: dict[str, tuple[dict[str, Any], str]] = {
    "an instant past the calendar in UTC": ({"start": POISON_START}, "Appointment.start"),
    "an instant before the calendar in UTC": (
        {"start": "0001-01-01T00:00:00+14:00", "end": "0001-01-01T00:30:00+14:00"},
        "Appointment.start",
    ),
    "CR/LF in a patient reference": (
        {"participant": [{"actor": {"reference": "Patient/p1\r\nBcc: x"}, "status": "accepted"}]},
        "Appointment.participant[0].actor.reference is not a valid reference",
    ),
    "a lone surrogate in a patient reference": (
        {"participant": [{"actor": {"reference": "Patient/p\ud800"}, "status": "accepted"}]},
        "check participant.0.actor.reference",
    ),
    "CR/LF in the id": ({"id": "bad\r\n1"}, "check id"),
    "a lone surrogate in the id": ({"id": "bad\ud800"}, "check id"),
    "an id longer than FHIR allows": ({"id": "b" * 65}, "id is not a FHIR id"),
    "a modifierExtension we do not understand": (
        {"participant": MODIFIER},
        "Appointment.participant[0].modifierExtension is not understood",
    ),
    "implicitRules": ({"implicitRules": "http://example.org/rules"}, "Appointment.implicitRules is set"),
    "a status outside the value set": ({"status": "x" * 40}, "status is not a code of the AppointmentStatus"),
    "more patients than the ledger remembers": (
        {"participant": MANY_PATIENTS},
        "names more patients than the ledger remembers",
    ),
}


@pytest.mark.parametrize("name", list(POISONS))
async def test_each_kind_of_poison_is_quarantined_with_a_reason_that_names_the_element(
    world: World, fhir: FhirState, paubox: SandboxState, name: str
) -> None:
    changes, expected = POISONS[name]
    runtime = await world()
    put_around(fhir, poisoned(**changes))
    report = await run_once(runtime)
    assert report.polls[0].error is None and report.polls[0].quarantined == 1
    assert booked(paubox) == {"a1", "a2", "a3", "a4"}
    [(_, seen)] = runtime.ledger.reports.problems(10)
    assert expected in (seen.problem or "")
    assert not unsafe(seen.resource_id + seen.version + (seen.problem or ""))  # escaped, never as received
    assert "Bcc" not in (seen.problem or "") and "not-really" not in (seen.problem or "")  # no values
    await run_once(runtime)  # a sweep reads it again: already recorded, not quarantined twice
    assert len(runtime.ledger.reports.problems(10)) == 1 and len(paubox.messages) == 4


async def test_date_window_quarantines_a_poison_and_a_vanished_one_read_back_poisoned(
    world: World, fhir: FhirState, paubox: SandboxState
) -> None:
    """The window's search and the read of an appointment that left the window each quarantine what they
    cannot process, and the poll goes on."""
    runtime = await world(WINDOW)
    put_around(fhir, poisoned(participant=MODIFIER))
    report = await run_once(runtime)
    assert report.polls[0].error is None and report.polls[0].quarantined == 1
    assert booked(paubox) == {"a1", "a2", "a3", "a4"}
    moved = appointment("a1", "p1", NOW + timedelta(days=60), participant=MODIFIER)  # leaves the window
    fhir.put(moved)
    fhir.put(appointment("a6", "p3", NOW + timedelta(days=7)))
    report = await run_once(runtime)
    assert report.polls[0].error is None and report.polls[0].quarantined == 1
    assert "a6" in booked(paubox)
    assert {seen.resource_id for _, seen in runtime.ledger.reports.problems(10)} == {"bad", "a1"}


async def test_a_deletion_that_cannot_be_processed_is_quarantined_and_others_are_not(
    world: World, fhir: FhirState, paubox: SandboxState
) -> None:
    """History: a DELETE entry naming an invalid id is quarantined (once, however often it is read again);
    a real deletion in the same poll still sends its cancellation."""
    runtime = await world(HISTORY)
    put_around(fhir, poisoned(id="bad\r\n2"))
    await run_once(runtime)
    counted = metrics.value("connector_quarantined_total", source="ehr")
    fhir.delete("Appointment", "bad\r\n2")
    fhir.delete("Appointment", "a1")
    report = await run_once(runtime)
    assert report.polls[0].error is None
    assert paubox.messages[-1]["subject"].endswith("is cancelled") and len(paubox.messages) == 5
    problems = sorted((seen.version, seen.problem or "") for _, seen in runtime.ledger.reports.problems(10))
    assert [version for version, _ in problems] == ["1", "deleted"]
    assert "a deletion names an Appointment by an id that is not a FHIR id" in problems[1][1]
    await run_once(runtime)  # the DELETE entry is read again within the overlap
    assert metrics.value("connector_quarantined_total", source="ehr") == counted + 1


@pytest.mark.postgres
async def test_a_page_the_ledger_refuses_is_recorded_one_version_at_a_time(
    world: World, fhir: FhirState, paubox: SandboxState, ledger: SqlLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net behind the checks: with the storable check switched off (the only patch here: nothing
    else lets bad data reach the ledger), PostgreSQL refuses a page holding a value longer than its column.
    The page is then recorded version by version: the refused one is quarantined, the rest are recorded and
    the cursor moves."""
    if ledger.dialect != "postgresql":
        pytest.skip("SQLite does not enforce column lengths")
    monkeypatch.setattr(decide, "check_storable", lambda *args, **kwargs: None)
    runtime = await world()
    put_around(fhir, poisoned(participant=MANY_PATIENTS))
    report = await run_once(runtime)
    assert report.polls[0].error is None and report.polls[0].quarantined == 1
    assert booked(paubox) == {"a1", "a2", "a3", "a4"}
    [(_, seen)] = runtime.ledger.reports.problems(10)
    assert seen.resource_id == "bad" and (seen.problem or "").startswith("recording failed: DataError at ")
    assert runtime.ledger.intake.cursor("ehr") is not None


MALFORMED_CONSENT = {
    "resourceType": "Consent",
    "id": "c1",
    "status": "active",
    "patient": {"reference": "Patient/p1"},
    "provision": {"type": "deny", "period": "always"},
}


async def test_a_preparation_that_crashes_is_retried_a_bounded_number_of_times_then_failed(
    world: World, fhir: FhirState, paubox: SandboxState
) -> None:
    """A notification whose preparation crashes (here on a malformed Consent) is retried after the backoff,
    counted against dispatch.max_attempts, then `failed` with where it crashed, and listed as needing
    attention; the other patients' emails go."""
    clock = Clock(NOW)
    runtime = await world("    consent:\n      enabled: true\n", "  max_attempts: 2\n", clock)
    fhir.put(MALFORMED_CONSENT)
    put_around(fhir, appointment("a9", "p4", NOW + timedelta(days=9)))
    await run_once(runtime)
    assert booked(paubox) == {"a2", "a3", "a4", "a9"}
    [pending] = runtime.ledger.reports.notifications([State.PENDING], 10)
    assert pending.resource_id == "a1" and pending.attempts == 1
    assert (pending.reason or "").startswith("preparation failed: AttributeError at connector/sending/recipients.py:")
    clock.now += timedelta(minutes=5)
    await run_once(runtime)
    attention = status(runtime.config)["attention"]
    assert [(n.resource_id, n.state) for n in attention] == [("a1", State.FAILED)]
    assert (attention[0].reason or "").startswith("gave up after 2 attempts: preparation failed: AttributeError")
    assert len(paubox.messages) == 4


async def test_a_notification_naming_an_invalid_patient_id_fails_at_once(
    world: World, fhir: FhirState, paubox: SandboxState
) -> None:
    """A notification planned by an earlier version from a CR/LF patient reference fails with the reason;
    it is never read with that id, and never stays pending."""
    runtime = await world()
    runtime.ledger.intake.add(
        [
            PlannedNotification(
                key="ehr:appointment-booked:old|p1",
                source="ehr",
                mapping="appointment-booked",
                event="booked",
                resource_type="Appointment",
                resource_id="a1",
                resource_version="1",
                patient_id="p1\r\nX",
                due_at=NOW,
            )
        ]
    )
    fhir.put(appointment("a1", "p1", NOW + timedelta(days=1)))
    await runtime.dispatcher.run()
    [failed] = runtime.ledger.reports.notifications([State.FAILED], 10)
    assert "not a FHIR id" in (failed.reason or "") and not [r for r in fhir.requests if "\r" in r]


async def test_an_address_that_is_not_exactly_one_address_is_never_used(
    world: World, fhir: FhirState, paubox: SandboxState
) -> None:
    """Email values are used as they are or not at all: a padded value, several addresses, a display name
    are passed over for the next candidate; with none left the notification is skipped."""
    hostile = [
        " zebulon.1@example.org",
        "zebulon.1@example.org;bcc@example.org",
        "Zebulon <zeb@example.org>",
        "zebulon.1@example.org\r\nBcc: x@example.org",
        "zebulon.1@localhost",
    ]
    telecom = [
        {"system": "email", "value": value, "use": "home", "rank": rank} for rank, value in enumerate(hostile, start=1)
    ]
    fhir.put(
        {**marker_patients()[0], "telecom": [*telecom, {"system": "email", "value": "zeb.ok@example.org", "rank": 9}]}
    )
    fhir.put({**marker_patients()[1], "telecom": telecom})
    runtime = await world()
    put_around(fhir, appointment("a9", "p3", NOW + timedelta(days=9)))
    await run_once(runtime)
    recipients = {m["recipients"][0] for m in paubox.messages}
    assert "zeb.ok@example.org" in recipients and not any(v.strip() in recipients for v in hostile)
    [skipped] = [n for n in runtime.ledger.reports.notifications([State.SKIPPED], 10) if n.resource_id == "a2"]
    assert skipped.reason == "Patient/p2 has no usable email address"


async def test_a_patient_with_a_modifier_extension_is_not_written_to(
    world: World, fhir: FhirState, paubox: SandboxState
) -> None:
    """FHIR forbids processing a resource as if a modifier extension it does not understand were absent:
    the Patient's notification fails with the element named; the others go."""
    fhir.put(
        {
            **marker_patients()[1],
            "modifierExtension": [{"url": "http://example.org/fhir/not-really", "valueBoolean": True}],
        }
    )
    runtime = await world()
    put_around(fhir, appointment("a9", "p3", NOW + timedelta(days=9)))
    await run_once(runtime)
    assert booked(paubox) == {"a1", "a3", "a4", "a9"}
    [failed] = runtime.ledger.reports.notifications([State.FAILED], 10)
    assert failed.resource_id == "a2" and "Patient.modifierExtension is not understood" in (failed.reason or "")
