"""Appointment lifecycle scenarios: sequences of FHIR states, an injected clock, and the exact emails sent.

Each scenario drives the real pipeline (FHIR test server → poll → ledger → dispatch → Paubox sandbox) with
the shipped mappings: booked, rescheduled, cancelled, reminders at −48 h and −2 h.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from connector import optout
from connector.config import load_config
from connector.daemon import run_once
from connector.delivery.paubox import PauboxRestMailer
from connector.models import State
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from tests.conftest import write_config
from tests.factories import appointment, patient

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)  # a Monday, noon UTC
H = timedelta(hours=1)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass(frozen=True)
class Sent:
    to: str
    mapping: str
    at: datetime
    subject: str
    text: str


class World:
    def __init__(self, runtime: Runtime, fhir: FhirState, paubox: SandboxState, clock: Clock) -> None:
        self.runtime, self.fhir, self.paubox, self.clock = runtime, fhir, paubox, clock

    async def at(self, moment: datetime) -> None:
        """Let the clock reach `moment` and run one cycle there."""
        self.clock.now = moment
        await run_once(self.runtime)

    def put(self, resource: dict[str, Any]) -> None:
        self.fhir.put(resource)

    def update(self, resource_id: str, **changes: Any) -> None:
        current = self.fhir.current("Appointment", resource_id)
        assert current is not None
        self.fhir.put({**current, **changes})

    def sent(self) -> list[Sent]:
        records = {r.key: r for r in self.runtime.ledger.reports.notifications([State.SENT], 1000)}
        result = []
        for message in self.paubox.messages:
            record = records[message["custom_headers"]["X-Notification-Key"]]
            result.append(
                Sent(
                    message["recipients"][0],
                    record.mapping,
                    self._sent_at(record.key),
                    message["subject"],
                    message["text"],
                )
            )
        return result

    def _sent_at(self, key: str) -> datetime:
        from sqlalchemy import select

        from connector.ledger.engine import N

        with self.runtime.ledger.engine.connect() as conn:
            value = conn.execute(select(N.c.sent_at).where(N.c.key == key)).scalar_one()
        assert value is not None
        return value  # type: ignore[no-any-return]

    def mappings_sent(self) -> list[str]:
        return [s.mapping for s in self.sent()]

    def reasons(self, state: State) -> dict[str, str]:
        return {
            f"{r.mapping}/{r.patient_id}": r.reason or ""
            for r in self.runtime.ledger.reports.notifications([state], 100)
        }


@pytest.fixture
async def world(tmp_path: Path, api_key_env: str, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    extra = getattr(request, "param", "")
    fhir, paubox, clock = FhirState(), SandboxState(api_key=api_key_env, username="clinic"), Clock(T0)
    location_zones = "    location_timezones:\n      Location/ny: America/New_York\n"
    config = load_config(
        write_config(tmp_path, "http://fhir.test", "https://paubox.test", extra_source=location_zones, extra=extra)
    )
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
    runtime = Runtime.open(config, clock, mailer=mailer, source_transport=httpx.ASGITransport(app=fhir_app(fhir)))
    runtime.cache.clear()
    yield World(runtime, fhir, paubox, clock)
    await runtime.aclose()


def robin(**extra: Any) -> dict[str, Any]:
    return patient("p1", "Robin", email="robin@example.org", **extra)


def visit(aid: str = "a1", pid: str = "p1", start: datetime = T0 + 72 * H, **extra: Any) -> dict[str, Any]:
    return appointment(aid, pid, start, **extra)


QUIET = 'quiet_hours:\n  start: "21:00"\n  end: "08:00"\n'


async def test_booked_confirms_now_and_reminds_48h_and_2h_before(world: World) -> None:
    world.put(robin())
    world.put(visit())
    await world.at(T0)
    assert [(s.to, s.mapping, s.at) for s in world.sent()] == [("robin@example.org", "appointment-booked", T0)]
    await world.at(T0 + 24 * H)  # the 48 h reminder is due at T0 + 24 h
    await world.at(T0 + 69 * H)  # the 2 h reminder is due at T0 + 70 h: not yet
    await world.at(T0 + 70 * H)
    await world.at(T0 + 80 * H)  # after the visit: nothing more
    assert [(s.mapping, s.at) for s in world.sent()] == [
        ("appointment-booked", T0),
        ("appointment-reminder-48h", T0 + 24 * H),
        ("appointment-reminder-2h", T0 + 70 * H),
    ]
    assert world.sent()[1].subject == "Reminder: your appointment at Example Clinic on December 10, 2026"


async def test_the_same_event_twice_sends_once(world: World) -> None:
    world.put(robin())
    world.put(visit())
    await world.at(T0)
    world.update("a1")  # a new version with nothing changed
    await world.at(T0 + H)
    await world.at(T0 + 2 * H)
    assert world.mappings_sent() == ["appointment-booked"]


async def test_several_updates_between_polls_give_one_change(world: World) -> None:
    world.put(robin())
    world.put(visit())
    await world.at(T0)
    world.update("a1", start=(T0 + 96 * H).isoformat(), end=(T0 + 97 * H).isoformat())
    world.update("a1", start=(T0 + 120 * H).isoformat(), end=(T0 + 121 * H).isoformat())
    world.update("a1", description="room 4")
    await world.at(T0 + H)
    assert world.mappings_sent() == ["appointment-booked", "appointment-rescheduled"]
    assert "Saturday, December 12, 2026" in world.sent()[1].text


async def test_reschedule_withdraws_the_old_reminder_and_arms_the_new_one(world: World) -> None:
    world.put(robin())
    world.put(visit())  # start T0 + 72 h: 48 h reminder due T0 + 24 h
    await world.at(T0)
    world.update("a1", start=(T0 + 120 * H).isoformat(), end=(T0 + 121 * H).isoformat())
    await world.at(T0 + 12 * H)
    await world.at(T0 + 24 * H)  # the old reminder time: nothing
    await world.at(T0 + 72 * H)  # the new reminder time
    assert [(s.mapping, s.at) for s in world.sent()] == [
        ("appointment-booked", T0),
        ("appointment-rescheduled", T0 + 12 * H),
        ("appointment-reminder-48h", T0 + 72 * H),
    ]
    assert "withdrawn: the appointment became rescheduled" in world.reasons(State.CANCELLED).values()


async def test_reschedule_before_the_confirmation_went_out_sends_one_confirmation(world: World) -> None:
    world.put(robin())
    world.put(visit())
    world.paubox.api_key = "rotated"  # the confirmation cannot go yet
    await world.at(T0)
    world.paubox.api_key = "test-sandbox-key"
    world.update("a1", start=(T0 + 120 * H).isoformat(), end=(T0 + 121 * H).isoformat())
    await world.at(T0 + H)
    assert world.mappings_sent() == ["appointment-booked"]
    assert "Saturday, December 12, 2026" in world.sent()[0].text


async def test_cancel_before_a_reminder(world: World) -> None:
    world.put(robin())
    world.put(visit())
    await world.at(T0)
    world.update("a1", status="cancelled")
    await world.at(T0 + H)
    await world.at(T0 + 24 * H)
    await world.at(T0 + 70 * H)
    assert [(s.mapping, s.at) for s in world.sent()] == [("appointment-booked", T0), ("appointment-cancelled", T0 + H)]


async def test_created_already_cancelled_sends_nothing(world: World) -> None:
    world.put(robin())
    world.put(visit(status="cancelled"))
    await world.at(T0)
    assert world.sent() == []


async def test_entered_in_error_withdraws_and_sends_nothing(world: World) -> None:
    world.put(robin())
    world.put(visit())
    await world.at(T0)
    world.update("a1", status="entered-in-error")
    await world.at(T0 + H)
    await world.at(T0 + 70 * H)
    assert world.mappings_sent() == ["appointment-booked"]
    assert world.runtime.ledger.reports.counts()[State.CANCELLED] == 2


@pytest.mark.parametrize(("required", "status"), [("information-only", "accepted"), ("required", "declined")])
async def test_information_only_and_declined_participants_get_nothing(world: World, required: str, status: str) -> None:
    world.put(robin())
    world.put(visit(participant=[{"actor": {"reference": "Patient/p1"}, "required": required, "status": status}]))
    await world.at(T0)
    await world.at(T0 + 70 * H)
    assert world.sent() == []


async def test_no_email_and_deceased_are_skipped_with_reasons(world: World) -> None:
    world.put(patient("p2", "Nomail"))
    world.put(patient("p3", "Gone", email="gone@example.org", deceasedDateTime="2026-01-02"))
    world.put(visit("a2", "p2"))
    world.put(visit("a3", "p3"))
    await world.at(T0)
    assert world.sent() == []
    reasons = world.reasons(State.SKIPPED)
    assert reasons["appointment-booked/p2"] == "Patient/p2 has no usable email address"
    assert reasons["appointment-booked/p3"] == "Patient/p3 is recorded as deceased"


async def test_address_choice_by_use_period_and_rank(world: World) -> None:
    world.put(
        patient(
            "p1",
            "Robin",
            telecom=[
                {"system": "email", "value": "old@example.org", "use": "old", "rank": 1},
                {
                    "system": "email",
                    "value": "expired@example.org",
                    "use": "home",
                    "rank": 1,
                    "period": {"end": "2025-01-01T00:00:00Z"},
                },
                {"system": "email", "value": "work@example.org", "use": "work"},
                {"system": "email", "value": "home@example.org", "use": "home"},
                {"system": "email", "value": "ranked@example.org", "use": "work", "rank": 2},
                {"system": "phone", "value": "+1 555 0100", "rank": 1},
            ],
        )
    )
    world.put(visit())
    await world.at(T0)
    assert [s.to for s in world.sent()] == ["ranked@example.org"]


async def test_replaced_by_writes_to_the_surviving_record(world: World) -> None:
    world.put(
        patient(
            "p1",
            "Robin",
            email="stale@example.org",
            link=[{"other": {"reference": "Patient/p9"}, "type": "replaced-by"}],
        )
    )
    world.put(patient("p9", "Robin", email="current@example.org"))
    world.put(visit())
    await world.at(T0)
    assert [s.to for s in world.sent()] == ["current@example.org"]


async def test_opt_out_by_address_or_identifier(world: World) -> None:
    world.put(robin(identifier=[{"system": "urn:oid:1.2.3", "value": "MRN-1"}]))
    world.put(patient("p2", "Sam", email="Sam@Example.org"))
    world.put(visit("a1", "p1"))
    world.put(visit("a2", "p2"))
    ledger = world.runtime.ledger
    ledger.optouts.add("identifier", optout.digest("identifier", "urn:oid:1.2.3|MRN-1"), "x", None)
    ledger.optouts.add("email", optout.digest("email", "sam@example.org"), "x", None)
    await world.at(T0)
    assert world.sent() == []
    assert all("opted out" in reason for reason in world.reasons(State.SKIPPED).values())


async def test_preferred_language_picks_the_dutch_variant(world: World) -> None:
    world.put(
        robin(
            communication=[
                {"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en"}]}},
                {"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "nl-NL"}]}, "preferred": True},
            ]
        )
    )
    world.put(visit())
    await world.at(T0)
    [message] = world.sent()
    assert message.subject == "Uw afspraak bij Example Clinic op 10 december 2026"
    assert "donderdag 10 december 2026" in message.text and "Beste Robin" in message.text


async def test_delete_after_booked_cancels_and_says_so(world: World) -> None:
    world.put(robin())
    world.put(visit())
    await world.at(T0)
    world.fhir.deleted.add(("Appointment", "a1"))
    await world.at(T0 + 24 * H)  # the 48 h reminder finds the appointment gone
    assert [(s.mapping, s.at) for s in world.sent()] == [
        ("appointment-booked", T0),
        ("appointment-cancelled", T0 + 24 * H),
    ]
    assert "Thursday, December 10, 2026" in world.sent()[1].text


async def test_late_first_sight_skips_or_sends_within_grace(world: World) -> None:
    world.put(robin())
    world.put(visit("late", start=T0 + 30 * H))  # 48 h reminder time passed 18 h ago: beyond the 6 h grace
    world.put(visit("graced", start=T0 + 44 * H))  # passed 4 h ago: within the grace
    await world.at(T0)
    reminders = [(s.mapping, s.at) for s in world.sent() if "reminder" in s.mapping]
    assert reminders == [("appointment-reminder-48h", T0)]
    assert world.reasons(State.SKIPPED)["appointment-reminder-48h/p1"] == (
        "its time (start-48h) had passed when the appointment was seen"
    )


@pytest.mark.parametrize("world", [QUIET], indirect=True)
async def test_quiet_hours_defer_and_never_past_the_start(world: World) -> None:
    # The source's zone is America/New_York (UTC-5): 08:00 there is 13:00 UTC.
    night = datetime(2026, 12, 8, 4, 0, tzinfo=UTC)  # 23:00 in New York
    world.put(robin())
    world.put(visit("morning", start=datetime(2026, 12, 10, 14, 0, tzinfo=UTC)))  # 2 h reminder 07:00 → 08:00
    world.put(visit("early", start=datetime(2026, 12, 10, 12, 30, tzinfo=UTC)))  # 05:30 → 08:00 is past 07:30
    await world.at(night)
    assert world.sent() == []  # the confirmations wait for the morning
    await world.at(datetime(2026, 12, 8, 13, 0, tzinfo=UTC))
    await world.at(datetime(2026, 12, 10, 13, 0, tzinfo=UTC))
    sent = [(s.mapping, s.at) for s in world.sent()]
    assert sent.count(("appointment-booked", datetime(2026, 12, 8, 13, 0, tzinfo=UTC))) == 2
    assert sent.count(("appointment-reminder-2h", datetime(2026, 12, 10, 13, 0, tzinfo=UTC))) == 1
    assert (
        "quiet hours until 08:00 (America/New_York) last past the appointment start"
        in world.reasons(State.SKIPPED).values()
    )


@pytest.mark.parametrize("world", [QUIET], indirect=True)
async def test_two_time_zones_for_rendering_and_quiet_hours(world: World) -> None:
    world.put(robin())
    amsterdam = visit("ams", start=datetime(2026, 12, 10, 14, 0, tzinfo=UTC))
    amsterdam["_start"] = {
        "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/tz-code", "valueCode": "Europe/Amsterdam"}]
    }
    new_york = visit("nyc", start=datetime(2026, 12, 10, 14, 0, tzinfo=UTC))
    new_york["participant"].append({"actor": {"reference": "Location/ny"}, "status": "accepted"})
    world.put(amsterdam)
    world.put(new_york)
    await world.at(datetime(2026, 12, 8, 2, 0, tzinfo=UTC))  # 03:00 in Amsterdam, 21:00 in New York
    assert world.sent() == []
    await world.at(datetime(2026, 12, 8, 7, 0, tzinfo=UTC))  # 08:00 Amsterdam; 02:00 New York
    assert [s.mapping for s in world.sent()] == ["appointment-booked"]
    assert "3:00 PM +0100" in world.sent()[0].text
    await world.at(datetime(2026, 12, 8, 13, 0, tzinfo=UTC))  # 08:00 New York
    assert "9:00 AM EST" in world.sent()[1].text


async def test_two_appointments_of_one_patient(world: World) -> None:
    world.put(robin())
    world.put(visit("a1", start=T0 + 72 * H))
    world.put(visit("a2", start=T0 + 96 * H))
    await world.at(T0)
    assert [s.mapping for s in world.sent()] == ["appointment-booked", "appointment-booked"]
    assert len({s.text for s in world.sent()}) == 2


CONSENT = "    consent:\n      enabled: true\n      purpose: PATRPT\n"


@pytest.fixture
async def consent_world(tmp_path: Path, api_key_env: str) -> AsyncIterator[World]:
    fhir, paubox, clock = FhirState(), SandboxState(api_key=api_key_env, username="clinic"), Clock(T0)
    config = load_config(write_config(tmp_path, "http://fhir.test", "https://paubox.test", extra_source=CONSENT))
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
    runtime = Runtime.open(config, clock, mailer=mailer, source_transport=httpx.ASGITransport(app=fhir_app(fhir)))
    yield World(runtime, fhir, paubox, clock)
    await runtime.aclose()


async def test_a_denying_consent_suppresses(consent_world: World) -> None:
    world = consent_world
    world.put(robin())
    world.put(patient("p2", "Sam", email="sam@example.org"))
    world.put(visit("a1", "p1"))
    world.put(visit("a2", "p2"))
    world.put(
        {
            "resourceType": "Consent",
            "id": "c1",
            "status": "active",
            "patient": {"reference": "Patient/p1"},
            "provision": {"type": "deny", "purpose": [{"code": "PATRPT"}]},
        }
    )
    world.put(
        {
            "resourceType": "Consent",
            "id": "c2",
            "status": "active",
            "patient": {"reference": "Patient/p2"},
            "provision": {"type": "deny", "purpose": [{"code": "RESEARCH"}]},
        }
    )
    await world.at(T0)
    assert [s.to for s in world.sent()] == ["sam@example.org"]
    assert world.reasons(State.SKIPPED)["appointment-booked/p1"] == "Patient/p1: Consent/c1 denies this purpose"
