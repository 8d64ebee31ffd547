"""Search parameters of the FHIR test server: which exist on each resource type, and how each one matches.

Three kinds, as FHIR defines them:

- `token`: a code (`status=booked,cancelled`) or an Identifier (`identifier=system|value`, `value` in any
  system, `|value` without a system, `system|` for any value in it); a comma list ORs.
- `reference`: `Type/id`, an absolute URL on this server, or a bare id (of the parameter's target type, or
  of any type where the parameter points at Any); a comma list ORs.
- `date`: a prefixed instant or day (`ge2026-12-10`, `lt2026-12-11T00:00:00Z`); repeating ANDs.

`_id` and `_lastUpdated` exist on every type. Pure: values in, tests out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from connector.fhir import last_updated, parse_instant, reference_id, reference_parts

Resource = dict[str, Any]
Test = Callable[[Resource], bool]
PREFIXES = ("ge", "gt", "le", "lt", "eq")
DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


class QueryError(ValueError):
    """A search the server refuses with 400; the text names the parameter and the accepted form."""


@dataclass(frozen=True)
class Param:
    """A search parameter: its kind, the element path it searches and, for a reference, the target type."""

    kind: Literal["token", "reference", "date"]
    path: tuple[str, ...]
    target: str | None = None  # reference: the type a bare id names; None: any type


ACTOR = ("participant", "actor")
IDENTIFIER = Param("token", ("identifier",))
STATUS = Param("token", ("status",))
SEARCH: dict[str, dict[str, Param]] = {
    "Appointment": {
        "date": Param("date", ("start",)),
        "patient": Param("reference", ACTOR, "Patient"),
        "practitioner": Param("reference", ACTOR, "Practitioner"),
        "location": Param("reference", ACTOR, "Location"),
        "status": STATUS,
        "identifier": IDENTIFIER,
    },
    "Patient": {"identifier": IDENTIFIER},
    "Consent": {"patient": Param("reference", ("patient",), "Patient"), "status": STATUS, "identifier": IDENTIFIER},
    "AppointmentResponse": {
        "appointment": Param("reference", ("appointment",), "Appointment"),
        "actor": Param("reference", ("actor",)),
        "patient": Param("reference", ("actor",), "Patient"),
        "part-status": Param("token", ("participantStatus",)),
        "identifier": IDENTIFIER,
    },
    "Communication": {
        "about": Param("reference", ("about",)),
        "subject": Param("reference", ("subject",)),
        "patient": Param("reference", ("subject",), "Patient"),
        "recipient": Param("reference", ("recipient",)),
        "based-on": Param("reference", ("basedOn",)),
        "status": STATUS,
        "identifier": IDENTIFIER,
    },
    "Task": {
        "focus": Param("reference", ("focus",)),
        "subject": Param("reference", ("for",)),
        "patient": Param("reference", ("for",), "Patient"),
        "owner": Param("reference", ("owner",)),
        "status": STATUS,
        "intent": Param("token", ("intent",)),
        "identifier": IDENTIFIER,
    },
}


def elements(resource: Any, path: tuple[str, ...]) -> list[Any]:
    """The values at `path` in `resource`, lists flattened at every step."""
    found: list[Any] = [resource]
    for step in path:
        found = [item.get(step) for item in found if isinstance(item, dict)]
        found = [leaf for item in found for leaf in (item if isinstance(item, list) else [item]) if leaf is not None]
    return found


def _bounds(raw: str) -> tuple[datetime, datetime] | None:
    """A day is the range of its instants; an instant is itself."""
    if DAY.fullmatch(raw):
        try:
            day = datetime.fromisoformat(raw).replace(tzinfo=UTC)
        except ValueError:
            return None
        return day, day + timedelta(days=1, microseconds=-1)
    moment = parse_instant(raw)
    return None if moment is None else (moment, moment)


def date_test(condition: str) -> Callable[[datetime | None], bool]:
    """A prefixed date condition (`ge2026-12-10`, `lt2026-12-11T00:00:00Z`) as a test of a value."""
    prefix, raw = (condition[:2], condition[2:]) if condition[:2] in PREFIXES else ("eq", condition)
    bounds = _bounds(raw)
    if bounds is None:
        raise QueryError(f"'{condition}' is not a date: use e.g. ge2026-12-10 or lt2026-12-11T00:00:00Z")
    low, high = bounds
    tests: dict[str, Callable[[datetime], bool]] = {
        "ge": lambda v: v >= low,
        "gt": lambda v: v > high,
        "le": lambda v: v <= high,
        "lt": lambda v: v < low,
        "eq": lambda v: low <= v <= high,
    }
    chosen = tests[prefix]
    return lambda value: value is not None and chosen(value)


def _token_matches(element: Any, wanted: str) -> bool:
    """One token condition against a code (a string) or an Identifier/Coding-like dict."""
    system, bar, code = wanted.rpartition("|") if "|" in wanted else ("", "", wanted)
    if isinstance(element, str):
        return element == code  # a code: its system is implied
    if not isinstance(element, dict):
        return False
    value = element.get("value", element.get("code"))
    if not bar:
        return value == code
    if not system:
        return element.get("system") in (None, "") and value == code  # `|value`: no system
    return element.get("system") == system and (code == "" or value == code)


def token_test(param: Param, value: str) -> Test:
    conditions = value.split(",")
    return lambda r: any(_token_matches(e, c) for e in elements(r, param.path) for c in conditions)


def reference_test(param: Param, value: str, base: str | None) -> Test:
    """References to the wanted resources: `Type/id`, `{base}/Type/id`, or a bare id."""
    if param.target is not None:
        target = param.target
        wanted = {(reference_id(item, target, base) if "/" in item else item) for item in value.split(",")} - {None}
        return lambda r: any(
            reference_id(ref.get("reference"), target, base) in wanted
            for ref in elements(r, param.path)
            if isinstance(ref, dict)
        )
    typed = {reference_parts(item, base) for item in value.split(",") if "/" in item} - {None}
    bare = {item for item in value.split(",") if item and "/" not in item}

    def matches(resource: Resource) -> bool:
        for ref in elements(resource, param.path):
            key = reference_parts(ref.get("reference") if isinstance(ref, dict) else None, base)
            if key is not None and (key in typed or key[1] in bare):
                return True
        return False

    return matches


def parameter_test(resource_type: str, name: str, value: str, base: str | None) -> Test:
    """The test of one `name=value` search condition on `resource_type` (a parameter it has)."""
    if name == "_id":
        wanted_ids = set(value.split(","))
        return lambda r: r.get("id") in wanted_ids
    if name == "_lastUpdated":
        updated = date_test(value)
        return lambda r: updated(last_updated(r))
    param = SEARCH[resource_type][name]
    if param.kind == "date":
        test = date_test(value)
        return lambda r: any(test(parse_instant(v)) for v in elements(r, param.path))
    if param.kind == "token":
        return token_test(param, value)
    return reference_test(param, value, base)


def actors(resource: Resource) -> list[str]:
    """The participant actor references of an Appointment, in document order."""
    return [ref["reference"] for ref in elements(resource, ACTOR) if isinstance(ref.get("reference"), str)]
