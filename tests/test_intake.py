"""Pure checks behind quarantine and address choice: what makes a resource version unprocessable, how the
reason is written without data, and which email values are usable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from connector import fhir
from connector.addresses import usable
from connector.errors import ResourceError
from connector.fhir import check_modifiers
from connector.intake.checks import check_appointment, check_storable, examine, reason
from connector.logs import safe_text, unsafe
from connector.models import PlannedNotification
from tests.factories import appointment, patient

NOW = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)

USABLE = ["robin@example.org", "o'brien@example.org", "first.last+tag@sub.example.org", "josé@exämple.org", "a@b.co"]
HOSTILE = [
    " robin@example.org",
    "robin@example.org ",
    "rob in@example.org",
    "robin\t@example.org",  # whitespace
    "robin@example.org\r\nBcc: x@example.org",
    "robin@example.org\n",
    "robin@exa\x00mple.org",  # controls
    "ro\ud800bin@example.org",
    "robin@example.org\u200b",
    "robin@example.o\u2028rg",  # surrogate, invisible
    "robin@example.org, other@example.org",
    "robin@example.org;other@example.org",  # several addresses
    "Robin <robin@example.org>",
    '"Robin" <robin@example.org>',
    "<robin@example.org>",  # header text
    '"quoted@x"@example.org',
    "robin@@example.org",
    "robin@localhost",
    "robin@",
    "@example.org",
    "robin",
    "",  # no domain, no local part
    "robin.@example.org",
    ".robin@example.org",
    "ro..bin@example.org",
    "robin@example..org",
    "robin@-example.org",
    "robin@example.org.",
    "robin@exam_ple.org",
    "robin@ex!ample.org",
    "robin@[127.0.0.1]",
    "robin@127.0.0.1",
    "a" * 65 + "@example.org",
]


@pytest.mark.parametrize("value", USABLE)
def test_a_plain_address_is_usable(value: str) -> None:
    assert usable(value)


@pytest.mark.parametrize("value", HOSTILE)
def test_a_value_that_is_not_exactly_one_address_is_unusable(value: str) -> None:
    assert not usable(value)


def test_choose_email_never_repairs_or_splits_and_falls_back_to_the_next_candidate() -> None:
    values = [" robin@example.org", "robin@example.org,x@example.org", "robin@example.org\r\nBcc: x@example.org"]
    telecom = [{"system": "email", "value": v, "rank": i} for i, v in enumerate(values, start=1)]
    person = patient("p1", "Robin", telecom=[*telecom, {"system": "email", "value": "r2@example.org", "rank": 9}])
    assert fhir.choose_email(person, NOW) == "r2@example.org"
    assert fhir.choose_email(patient("p2", "Robin", telecom=telecom), NOW) is None


def test_safe_text_escapes_controls_and_lone_surrogates() -> None:
    assert safe_text("a\r\nb\x00\ud800\u2028c", 100) == "a\\u000d\\u000ab\\u0000\\ud800\\u2028c"
    assert safe_text("é—ok", 100) == "é—ok" and not unsafe("é—ok")
    assert safe_text("x" * 10, 4) == "xxxx"
    assert fhir.describe({"resourceType": "Appointment", "id": "a\r\n1"}) == "Appointment/a\\u000d\\u000a1"


def good() -> dict[str, Any]:
    return appointment("a1", "p1", NOW + timedelta(days=1))


@pytest.mark.parametrize(
    ("changes", "element"),
    [
        ({"start": "9999-12-31T20:00:00-14:00"}, "Appointment.start"),
        ({"end": "0001-01-01T00:00:00+14:00"}, "Appointment.end"),
        ({"meta": {"lastUpdated": "9999-12-31T23:00:00-10:00"}}, "Appointment.meta.lastUpdated"),
        ({"start": "not a date"}, "Appointment.start"),
        ({"id": "a/1"}, "id is not a FHIR id"),
        ({"status": "booked-ish"}, "status"),
        ({"modifierExtension": [{"url": "http://example.org/x"}]}, "Appointment.modifierExtension"),
        ({"_start": {"modifierExtension": [{"url": "http://example.org/x"}]}}, "Appointment._start.modifierExtension"),
        ({"implicitRules": "http://example.org/rules"}, "implicitRules"),
        ({"participant": [{"actor": {"reference": "Patient/p1\n"}}]}, "participant[0].actor.reference"),
        (
            {"participant": [{"actor": {"reference": "http://fhir.test/Patient/" + "p" * 65}}]},
            "participant[0].actor.reference",
        ),
    ],
)
def test_check_appointment_names_the_element_that_stops_processing(changes: dict[str, Any], element: str) -> None:
    with pytest.raises(ResourceError, match=element.replace("[", r"\[").replace("]", r"\]")):
        check_appointment({**good(), **changes}, "http://fhir.test")


def test_check_appointment_lets_ordinary_appointments_and_foreign_references_through() -> None:
    check_appointment(good(), "http://fhir.test")
    foreign = {**good(), "participant": [{"actor": {"reference": "https://other.example.org/Patient/x y"}}]}
    check_appointment(foreign, "http://fhir.test")  # another server's reference is not ours to follow
    check_modifiers(patient("p1", "Robin", extension=[{"url": "http://example.org/x", "valueString": "y"}]))


def test_a_reason_names_the_error_and_where_it_was_raised_never_its_message() -> None:
    try:
        datetime(9999, 12, 31, tzinfo=UTC) + timedelta(days=2)
    except OverflowError as exc:
        text = reason(exc, "planning")
    assert text.startswith("planning failed: OverflowError at ") and "test_intake.py" in text
    try:
        {"Zebulon": 1}["Quixotica"]
    except KeyError as exc:
        assert "Quixotica" not in reason(exc, "planning")


def test_check_storable_refuses_what_a_ledger_column_would_refuse() -> None:
    planned = PlannedNotification(
        key="ehr:m:a1|p1",
        source="ehr",
        mapping="m",
        event="booked",
        resource_type="Appointment",
        resource_id="a1",
        resource_version="1",
        patient_id="p1",
        due_at=NOW,
    )
    check_storable([planned], ("p1",))
    for bad in ({"key": "ehr:m:a\ud8001"}, {"key": "ehr:m:" + "k" * 600}, {"patient_id": "p\r\n1"}):
        with pytest.raises(ResourceError):
            check_storable([PlannedNotification(**{**planned.__dict__, **bad})])
    with pytest.raises(ResourceError, match="more patients"):
        check_storable([], [f"p{i}" + "x" * 60 for i in range(40)])


def test_examine_records_every_entry_even_without_an_id_and_moves_the_newest_past_the_bad() -> None:
    bad = {
        **good(),
        "id": "bad",
        "start": "9999-12-31T20:00:00-14:00",
        "meta": {"versionId": "1", "lastUpdated": "2026-11-21T09:00:00Z"},
    }
    page = fhir.SearchPage(matches=[good(), bad, None, {"resourceType": "Appointment"}])
    examined = examine(page, None)
    assert [s.resource_id for s in examined.seen] == ["a1", "bad", "(no id)", "(no id)"]
    assert [s.problem is None for s in examined.seen] == [True, False, False, False]
    assert examined.newest == datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
