"""What a new version of an appointment means (connector.intake.decide), as a table: the remembered state
and who was told, a new version, and what the ledger is to record. Pure: no ledger, no source."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.config.sources import FhirPollSourceConfig
from connector.intake.checks import Seen
from connector.intake.decide import Decision, Rules, decide, deletion
from connector.lifecycle import Snapshot
from connector.mapping.loader import load_mappings
from connector.models import fixed_clock
from tests.factories import appointment

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
START = NOW + timedelta(days=10)
RULES = Rules(
    "ehr",
    FhirPollSourceConfig.model_validate({"base_url": "https://ehr.example.org/fhir"}),
    load_mappings(ROOT / "mappings"),
    None,
    fixed_clock(NOW),
)
BOOKED = Snapshot("booked", START, START + timedelta(minutes=30), "2", ("p1",), NOW - timedelta(hours=1))
TOLD = {("a1", "p1")}
REMINDERS = ["appointment-reminder-2h", "appointment-reminder-48h"]
MANY = [{"actor": {"reference": f"Patient/patient-{i:05}"}, "status": "accepted"} for i in range(200)]


def version(resource: dict[str, Any], updated: datetime = NOW) -> Seen:
    return Seen(resource, "3", updated)


def outline(decision: Decision) -> tuple[list[str], list[tuple[str, ...]], dict[str, str | None], int]:
    """(mappings planned, patients withdrawn, remembered statuses, versions quarantined)."""
    return (
        sorted(n.mapping for n in decision.notifications),
        [w.patients for w in decision.withdrawals],
        {a: s.status if s else None for a, s in decision.snapshots.items()},
        len(decision.quarantined),
    )


CASES = [
    # (what happened, remembered, new version, who was told, expected outline)
    (
        "first sight of a booking",
        None,
        version(appointment("a1", "p1", START)),
        set(),
        (["appointment-booked", *REMINDERS], [], {"a1": "booked"}, 0),
    ),
    (
        "an older version than the one remembered",
        BOOKED,
        version(appointment("a1", "p1", START, "cancelled"), NOW - timedelta(hours=2)),
        TOLD,
        ([], [], {}, 0),
    ),
    (
        "cancelled after an email went",
        BOOKED,
        version(appointment("a1", "p1", START, "cancelled")),
        TOLD,
        (["appointment-cancelled"], [("p1",)], {"a1": "cancelled"}, 0),
    ),
    (
        "cancelled before any email went: withdrawn, nothing to say",
        BOOKED,
        version(appointment("a1", "p1", START, "cancelled")),
        set(),
        ([], [("p1",)], {"a1": "cancelled"}, 0),
    ),
    (
        "moved, and the patient was told of the old time",
        BOOKED,
        version(appointment("a1", "p1", START + timedelta(days=1))),
        TOLD,
        ([*REMINDERS, "appointment-rescheduled"], [("p1",)], {"a1": "booked"}, 0),
    ),
    (
        "moved, never told: this is their confirmation",
        BOOKED,
        version(appointment("a1", "p1", START + timedelta(days=1))),
        set(),
        (["appointment-booked", *REMINDERS], [("p1",)], {"a1": "booked"}, 0),
    ),
    (
        "a new version that changes nothing the mappings see",
        BOOKED,
        version(appointment("a1", "p1", START, comment="rebooked room")),
        TOLD,
        ([], [], {"a1": "booked"}, 0),
    ),
    (
        "entered in error at first sight",
        None,
        version(appointment("a1", "p1", START, "entered-in-error")),
        set(),
        ([], [], {"a1": "entered-in-error"}, 0),
    ),
    (
        "more patients than the ledger remembers: quarantined alone",
        None,
        version(appointment("a1", "p1", START, participant=MANY)),
        set(),
        ([], [], {}, 1),
    ),
]


@pytest.mark.parametrize(("remembered", "seen", "told", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_what_a_new_version_means(
    remembered: Snapshot | None, seen: Seen, told: set[tuple[str, str]], expected: tuple[Any, ...]
) -> None:
    before = {"a1": remembered} if remembered else {}
    assert outline(decide(RULES, [seen], before, told)) == expected


def test_each_version_of_a_page_is_decided_against_the_one_before_it() -> None:
    """Two versions of one appointment on a page: the second is compared with the first, not the ledger."""
    first = version(appointment("a1", "p1", START), NOW - timedelta(minutes=2))
    second = version(appointment("a1", "p1", START, "cancelled"), NOW - timedelta(minutes=1))
    decision = decide(RULES, [first, second], {}, set())
    assert outline(decision) == (["appointment-booked", *REMINDERS], [("p1",)], {"a1": "cancelled"}, 0)


def test_a_deletion_withdraws_and_announces_it_to_those_told() -> None:
    decision = deletion(RULES, "a1", BOOKED, TOLD)
    assert outline(decision) == (["appointment-cancelled"], [("p1",)], {"a1": None}, 0)
    [cancellation] = decision.notifications
    assert cancellation.resource_version == "deleted-after-2"


def longer(minutes: int) -> Seen:
    """The remembered booking, same start, ending `minutes` after it."""
    return version(appointment("a1", "p1", START, end=(START + timedelta(minutes=minutes)).isoformat()))


def test_an_end_only_change_is_remembered_and_sends_nothing_by_default() -> None:
    decision = decide(RULES, [longer(60)], {"a1": BOOKED}, TOLD)
    assert outline(decision) == ([], [], {"a1": "booked"}, 0)
    assert decision.snapshots["a1"] is not None and decision.snapshots["a1"].end == START + timedelta(minutes=60)


def test_reschedule_on_start_and_end_restores_the_reschedule_email_for_an_end_only_change() -> None:
    """Globally (config `reschedule_on`) or per mapping: the reminders stand either way (nothing withdrawn,
    nothing re-armed: they count from the start)."""
    everything = Rules(RULES.source, RULES.settings, RULES.mappings, None, RULES.clock, frozenset({"start", "end"}))
    assert outline(decide(everything, [longer(60)], {"a1": BOOKED}, TOLD)) == (
        ["appointment-rescheduled"],
        [],
        {"a1": "booked"},
        0,
    )
    # never told about the appointment: the confirmation planned earlier still holds, nothing new
    assert outline(decide(everything, [longer(60)], {"a1": BOOKED}, set())) == ([], [], {"a1": "booked"}, 0)
    # the start moved as well: as before, withdrawn and re-armed
    moved = version(appointment("a1", "p1", START + timedelta(hours=1)))
    assert outline(decide(RULES, [moved], {"a1": BOOKED}, TOLD))[:2] == (
        [*REMINDERS, "appointment-rescheduled"],
        [("p1",)],
    )


def test_a_mapping_may_set_its_own_reschedule_on(tmp_path: Path) -> None:
    folder = tmp_path / "mappings"
    folder.mkdir()
    for file in (ROOT / "mappings").glob("appointment-rescheduled.*"):
        text = file.read_text()
        if file.suffix == ".yaml":
            text = text.replace("  event: rescheduled\n", "  event: rescheduled\nreschedule_on: [start, end]\n")
        (folder / file.name).write_text(text)
    for file in (ROOT / "mappings").glob("_layout*"):
        (folder / file.name).write_text(file.read_text())
    rules = Rules(RULES.source, RULES.settings, load_mappings(folder), None, RULES.clock)
    assert outline(decide(rules, [longer(45)], {"a1": BOOKED}, TOLD))[0] == ["appointment-rescheduled"]


STATUSES = ["proposed", "pending", "booked", "arrived", "fulfilled", "cancelled", "noshow", "entered-in-error"]


@settings(max_examples=50, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(STATUSES), st.integers(min_value=0, max_value=3), st.integers(-30, 30)),
        min_size=1,
        max_size=6,
    )
)
def test_every_version_is_remembered_skipped_as_older_or_quarantined(steps: list[tuple[str, int, int]]) -> None:
    """Whatever a source sends of one appointment, deciding never fails as a whole, and what it remembers is
    the newest version it did not set aside."""
    versions = [
        version(appointment("a1", "p1", START + timedelta(days=days), status), NOW + timedelta(minutes=minutes))
        for status, days, minutes in steps
    ]
    decision = decide(RULES, versions, {}, set())
    kept = [v for v in versions if v.last_updated is not None]
    newest: Seen | None = None
    for v in kept:
        if newest is None or v.last_updated >= newest.last_updated:  # type: ignore[operator]
            newest = v
    assert newest is not None and not decision.quarantined
    assert decision.snapshots["a1"] is not None and decision.snapshots["a1"].status == newest.resource["status"]
    assert all((n.resource_id, n.patient_id) == ("a1", "p1") for n in decision.notifications)
