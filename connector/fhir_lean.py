"""The lean check of an Appointment or a Patient: the elements the connector reads (connector.fhir, the
lifecycle, the shipped mappings), each with its FHIR R4 type, cardinality and required value set; every other
element passes unread. It costs a few percent of the full `fhir.resources` validation, which stays one
setting away (`sources.<name>.validation: full`) and is what `connector validate` and `render` use.

A resource that passes here may still be invalid in an element nobody reads. One that fails here fails the
full validation too (the types are R4's), with the same kind of message, the paths of the bad elements; but
for JSON of the wrong type that the full validation coerces ("yes" for a boolean, "1" for a number) and an
empty `participant`, which the connector, reading the JSON itself, would misread. Codes are checked as the
full validation checks them, by their form, not against their value sets.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, StringConstraints, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

# FHIR R4 primitive types as regular expressions (http://hl7.org/fhir/R4/datatypes.html).
_DATE = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?"
_ZONE = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_FULL_DATE = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])"

Instant = Annotated[str, StringConstraints(pattern=rf"^{_FULL_DATE}T{_TIME}{_ZONE}$")]
DateTime = Annotated[str, StringConstraints(pattern=rf"^{_DATE}(T{_TIME}{_ZONE})?$")]
Code = Annotated[str, StringConstraints(pattern=r"^[^\s]+( [^\s]+)*$")]
Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9\-.]+$")]  # the length is checked later (checks.py)
Text = Annotated[str, StringConstraints(pattern=r"^[\s\S]+$")]
_STRICT = ConfigDict(strict=True)  # JSON types as they are: no "7" for 7, no 7 for "7"


@with_config(_STRICT)
class Meta(TypedDict, total=False):
    versionId: Text
    lastUpdated: Instant


@with_config(_STRICT)
class Coding(TypedDict, total=False):
    system: Text
    code: Code
    display: Text


@with_config(_STRICT)
class CodeableConcept(TypedDict, total=False):
    coding: list[Coding]
    text: Text


@with_config(_STRICT)
class Reference(TypedDict, total=False):
    reference: Text
    display: Text


@with_config(_STRICT)
class Period(TypedDict, total=False):
    start: DateTime
    end: DateTime


@with_config(_STRICT)
class Extension(TypedDict, total=False):
    url: Text


@with_config(_STRICT)
class Participant(TypedDict, total=False):
    actor: Reference
    required: Code
    status: Code
    type: list[CodeableConcept]


@with_config(_STRICT)
class Appointment(TypedDict, total=False):
    resourceType: Literal["Appointment"]
    id: Id
    meta: Meta
    extension: list[Extension]
    status: Code
    cancelationReason: CodeableConcept
    serviceCategory: list[CodeableConcept]
    serviceType: list[CodeableConcept]
    specialty: list[CodeableConcept]
    appointmentType: CodeableConcept
    reasonCode: list[CodeableConcept]
    priority: int
    description: Text
    start: Instant
    end: Instant
    minutesDuration: int
    created: DateTime
    comment: Text
    patientInstruction: Text
    participant: list[Participant]


@with_config(_STRICT)
class HumanName(TypedDict, total=False):
    use: Code
    text: Text
    family: Text
    given: list[Text]
    prefix: list[Text]
    suffix: list[Text]


@with_config(_STRICT)
class ContactPoint(TypedDict, total=False):
    system: Code
    value: Text
    use: Code
    rank: int
    period: Period


@with_config(_STRICT)
class Identifier(TypedDict, total=False):
    system: Text
    value: Text


@with_config(_STRICT)
class Communication(TypedDict, total=False):
    language: CodeableConcept
    preferred: bool


@with_config(_STRICT)
class Link(TypedDict, total=False):
    other: Reference
    type: Code


@with_config(_STRICT)
class Patient(TypedDict, total=False):
    resourceType: Literal["Patient"]
    id: Id
    meta: Meta
    extension: list[Extension]
    identifier: list[Identifier]
    active: bool
    name: list[HumanName]
    telecom: list[ContactPoint]
    gender: Code
    birthDate: Annotated[str, StringConstraints(pattern=rf"^{_DATE}$")]
    deceasedBoolean: bool
    deceasedDateTime: DateTime
    communication: list[Communication]
    link: list[Link]


_ADAPTERS: dict[str, TypeAdapter[Any]] = {"Appointment": TypeAdapter(Appointment), "Patient": TypeAdapter(Patient)}

# Required by R4 among the elements read here: (element, its parent's path), checked after the types.
_REQUIRED: dict[str, tuple[tuple[str, ...], ...]] = {
    "Appointment": (("status",), ("participant",), ("participant", "*", "status")),
    "Patient": (("communication", "*", "language"), ("link", "*", "other"), ("link", "*", "type")),
}


def _missing(resource: dict[str, Any], path: tuple[str, ...]) -> list[str]:
    """Paths ('participant.0.status') where a required element is absent or an empty list."""
    found: list[tuple[str, Any]] = [("", resource)]
    *parents, last = path
    for step in parents:
        deeper: list[tuple[str, Any]] = []
        for where, value in found:
            item = value.get(step) if isinstance(value, dict) else None
            if step == "*" and isinstance(value, list):
                deeper += [(f"{where}.{i}", v) for i, v in enumerate(value)]
            elif item is not None:
                deeper.append((f"{where}.{step}".lstrip("."), item))
        found = deeper
    return [
        f"{where}.{last}".lstrip(".")
        for where, value in found
        if isinstance(value, dict) and value.get(last) in (None, [], "")
    ]


def problems(resource: dict[str, Any]) -> list[str] | None:
    """The paths of the elements the lean check refuses (empty: fine); None for a type it does not check."""
    adapter = _ADAPTERS.get(str(resource.get("resourceType")))
    if adapter is None:
        return None
    try:
        adapter.validate_python(resource)
        where: list[str] = []
    except ValidationError as exc:
        # Element paths only: pydantic messages may quote the input, which is PHI.
        where = [".".join(str(p) for p in e["loc"] if not str(p).startswith("function-")) for e in exc.errors()]
    for path in _REQUIRED[str(resource["resourceType"])]:
        where += _missing(resource, path)
    return sorted({w or "(resource)" for w in where})
