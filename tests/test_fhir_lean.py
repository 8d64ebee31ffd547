"""The lean check (the default, `sources.<name>.validation: lean`) against the full R4 validation: what both
refuse, with the same kind of message; what only the full one sees; and the setting's effect on a poll."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from connector import fhir, fhir_lean
from connector.config import load_config
from connector.errors import ResourceError
from tests.conftest import write_config
from tests.factories import hl7

Edit = Callable[[dict[str, Any]], None]


def edited(name: str, edit: Edit) -> dict[str, Any]:
    resource = copy.deepcopy(hl7(name))
    edit(resource)
    return resource


BROKEN: list[tuple[str, str, Edit, str]] = [
    (
        "Appointment-example",
        "a number for a code",
        lambda r: r["participant"][0].update(status=7),
        "participant.0.status",
    ),
    ("Appointment-example", "a code with a space first", lambda r: r.update(status=" booked"), "status"),
    ("Appointment-example", "no status", lambda r: r.pop("status"), "status"),
    ("Appointment-example", "a date for an instant", lambda r: r.update(start="2026-12-01"), "start"),
    ("Appointment-example", "an instant without zone", lambda r: r.update(end="2026-12-01T10:00:00"), "end"),
    (
        "Appointment-example",
        "participant without status",
        lambda r: r["participant"][1].pop("status"),
        "participant.1.status",
    ),
    ("Appointment-example", "a string for a list", lambda r: r.update(serviceType="Check-up"), "serviceType"),
    ("Patient-example", "a string for telecom", lambda r: r.update(telecom="x@example.org"), "telecom"),
    ("Patient-example", "a list for a code", lambda r: r["telecom"][0].update(system=["email"]), "telecom.0.system"),
    (
        "Patient-example",
        "a link without type",
        lambda r: r.update(link=[{"other": {"reference": "Patient/x"}}]),
        "link.0.type",
    ),
    ("Patient-example", "a number in a name", lambda r: r["name"][0].update(family=12), "name.0.family"),
]

# JSON that the full validation coerces or lets pass, and that the connector, reading the JSON itself, would
# misread: the lean check refuses it.
STRICTER: list[tuple[str, str, Edit, str]] = [
    ("Appointment-example", "no participant", lambda r: r.update(participant=[]), "participant"),
    ("Patient-example", "a string for a boolean", lambda r: r.update(deceasedBoolean="yes"), "deceasedBoolean"),
    ("Patient-example", "a string for a number", lambda r: r["telecom"][0].update(rank="1"), "telecom.0.rank"),
]


def refused_by_lean(resource: dict[str, Any], path: str) -> None:
    with pytest.raises(ResourceError) as lean:
        fhir.validate(resource, lean=True)
    assert str(lean.value).startswith(f"{fhir.describe(resource)} is not valid FHIR R4: check ")
    assert path in str(lean.value).split("check ", 1)[1].split(", ")


@pytest.mark.parametrize(("name", "what", "edit", "path"), BROKEN, ids=[b[1] for b in BROKEN])
def test_lean_refuses_what_the_full_validation_refuses_and_names_the_element(
    name: str, what: str, edit: Edit, path: str
) -> None:
    resource = edited(name, edit)
    refused_by_lean(resource, path)
    with pytest.raises(ResourceError, match="is not valid FHIR R4"):
        fhir.validate(resource)


@pytest.mark.parametrize(("name", "what", "edit", "path"), STRICTER, ids=[b[1] for b in STRICTER])
def test_lean_refuses_json_of_the_wrong_type_that_the_full_validation_coerces(
    name: str, what: str, edit: Edit, path: str
) -> None:
    resource = edited(name, edit)
    refused_by_lean(resource, path)
    fhir.validate(resource)


def test_the_messages_quote_no_value() -> None:
    resource = edited("Patient-example", lambda r: r["telecom"][0].update(system="robin@example.org "))
    with pytest.raises(ResourceError) as refused:
        fhir.validate(resource, lean=True)
    assert "example.org" not in str(refused.value)


@pytest.mark.parametrize("name", ["Appointment-example", "Appointment-2docs", "Patient-example"])
def test_lean_passes_the_official_examples(name: str) -> None:
    assert fhir_lean.problems(hl7(name)) == []
    fhir.validate(hl7(name), lean=True)


def test_an_element_nobody_reads_is_only_checked_by_the_full_validation() -> None:
    resource = edited("Patient-example", lambda r: r.update(maritalStatus=5))
    fhir.validate(resource, lean=True)
    with pytest.raises(ResourceError, match="check maritalStatus"):
        fhir.validate(resource)


def test_other_resource_types_get_the_full_validation() -> None:
    assert fhir_lean.problems({"resourceType": "Consent", "id": "c"}) is None


def test_lean_is_the_default_and_full_one_setting_away(tmp_path: Any) -> None:
    default = load_config(write_config(tmp_path, "http://fhir.test", "https://paubox.test", name="a.yaml"))
    full = load_config(
        write_config(tmp_path, "http://fhir.test", "https://paubox.test", source={"validation": "full"}, name="b.yaml")
    )
    assert default.sources["ehr"].validation == "lean" and full.sources["ehr"].validation == "full"
