"""Searches of the FHIR test server: the search parameters of each resource type and how each matches, and
how a server in each mode parses a search (which parameters it honours, the vendor rules of `epic` and
`cerner`, result order and page size). Pure: parameters in, a `Query` out.

Parameter kinds, as FHIR defines them:

- `token`: a code (`status=booked,cancelled`) or an Identifier (`identifier=system|value`, `value` in any
  system, `|value` without a system, `system|` for any value in it); a comma list ORs.
- `reference`: `Type/id`, an absolute URL on this server, or a bare id (of the parameter's target type, or
  of any type where the parameter points at Any); a comma list ORs.
- `date`: a prefixed instant or day (`ge2026-12-10`, `lt2026-12-11T00:00:00Z`); repeating ANDs.

Full mode searches every type in `SEARCH` with its parameters plus `_id`, `_count`, `_lastUpdated`,
`_sort=[-]_lastUpdated` and `_include=Appointment:patient`. The vendor modes imitate a read API:
Appointment, Patient and Consent only, with the parameters those vendors document.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from connector.fhir import last_updated, parse_instant, reference_id, reference_parts

Resource = dict[str, Any]
Test = Callable[[Resource], bool]
Pairs = list[tuple[str, str]]
MODES = ("full", "epic", "cerner")
Mode = Literal["full", "epic", "cerner"]
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


COMMON = frozenset({"_id", "_count", "_lastUpdated", "_sort", "_include"})
CONDITIONS = frozenset({"_id", "_lastUpdated"})  # the common parameters that filter
VENDOR_SEARCHABLE = ("Appointment", "Patient", "Consent")
VENDOR_PARAMETERS = {
    "Appointment": frozenset({"date", "patient", "practitioner", "location", "status"}),
    "Consent": frozenset({"patient", "status"}),
    "Patient": frozenset[str](),
}
VENDOR_IGNORED = frozenset({"_lastUpdated", "_sort", "_include"})
EPIC_APPOINTMENT = frozenset({"patient", "date", "status", "_count", "_id"})
ACTORS = ("patient", "practitioner", "location")
LATEST = datetime.max.replace(tzinfo=UTC)


@dataclass
class Query:
    """A parsed search: the honoured parameters (for the self link), tests, order, includes, page size."""

    used: Pairs = field(default_factory=list)
    tests: list[Callable[[Resource], bool]] = field(default_factory=list)
    sort: str | None = None  # "_lastUpdated", "-_lastUpdated" or "start"
    include_patients: bool = False
    count: int = 20

    def matches(self, resource: Resource) -> bool:
        return all(test(resource) for test in self.tests)

    def ids(self) -> list[str]:
        """The ids an `_id` condition names (looked up directly, like a server's index), in order."""
        return list(dict.fromkeys(i for name, value in self.used if name == "_id" for i in value.split(",")))


def searchable(mode: str) -> tuple[str, ...]:
    """The resource types a server in `mode` searches."""
    return tuple(SEARCH) if mode == "full" else VENDOR_SEARCHABLE


def parameter_type(resource_type: str, name: str) -> str:
    """The FHIR search parameter type, for the CapabilityStatement."""
    if name in ("_id", "_lastUpdated"):
        return "token" if name == "_id" else "date"
    return SEARCH[resource_type][name].kind


def honoured(resource_type: str, mode: str, pairs: Pairs) -> frozenset[str]:
    """The parameter names a server in `mode` uses for this search; all others are silently ignored."""
    if mode == "full":
        return COMMON | frozenset(SEARCH.get(resource_type, {}))
    if resource_type == "Appointment" and any(name == "_id" for name, _ in pairs):
        return frozenset({"_id", "_count"})  # Epic: "All others will be ignored"; Oracle: _id stands alone
    if mode == "epic" and resource_type == "Appointment":
        return EPIC_APPOINTMENT
    return (COMMON | VENDOR_PARAMETERS.get(resource_type, frozenset())) - VENDOR_IGNORED


def check_cerner(pairs: Pairs) -> None:
    """Oracle Health's Appointment rules: `_id`, or exactly one of patient|practitioner|location with `date`."""
    names = [name for name, _ in pairs]
    if "_id" in names:
        return
    actors = [name for name in names if name in ACTORS]
    if not actors:
        raise QueryError(
            "Appointment search requires _id, or one of patient, practitioner or location together with date"
        )
    if len(set(actors)) > 1:
        raise QueryError(
            f"{' and '.join(sorted(set(actors)))} may not be combined: search by one of patient, "
            "practitioner or location"
        )
    if len(actors) > 1:
        raise QueryError(f"{actors[0]} may appear only once: give several ids as a comma-separated list")
    dates = [value for name, value in pairs if name == "date"]
    prefixes = sorted(value[:2] for value in dates)
    timed = all("T" in value for value in dates)
    if timed and ((len(dates) == 1 and prefixes[0] in PREFIXES) or (len(dates) == 2 and prefixes == ["ge", "lt"])):
        return
    raise QueryError(
        f"{actors[0]} needs date, once with a prefix and a time (date=ge2026-12-10T00:00:00Z) "
        "or twice as a ge + lt pair"
    )


def build_query(
    resource_type: str, pairs: Pairs, mode: str = "full", ignore: Iterable[str] = (), base: str | None = None
) -> Query:
    """Parse a search as a server in `mode` would; raise QueryError for a search it refuses."""
    if mode == "cerner" and resource_type == "Appointment":
        check_cerner(pairs)
    allowed = honoured(resource_type, mode, pairs) - frozenset(ignore)
    query = Query(sort="start" if mode == "cerner" and resource_type == "Appointment" else None)
    for name, value in pairs:
        if name not in allowed:
            continue
        if name == "_count":
            try:
                query.count = max(1, min(int(value), 500))
            except ValueError:
                raise QueryError("_count must be a number") from None
        elif name == "_sort":
            if value in ("_lastUpdated", "-_lastUpdated"):
                query.sort = value
                query.used.append((name, value))
        elif name == "_include":
            if value == "Appointment:patient" and resource_type == "Appointment":
                query.include_patients = True
                query.used.append((name, value))
        else:
            query.tests.append(parameter_test(resource_type, name, value, base))
            query.used.append((name, value))
    query.used.append(("_count", str(query.count)))
    return query


def condition(resource_type: str, pairs: Pairs, base: str | None = None) -> Query:
    """A search used as a precondition (`If-None-Exist`): every parameter must be one this server filters
    on, since ignoring one would match too much. QueryError names the first that is not."""
    if resource_type not in SEARCH:
        raise QueryError(f"{resource_type} is not searchable here, so it cannot be created conditionally")
    if not pairs:
        raise QueryError("If-None-Exist is empty: give a search such as identifier=system|value")
    known = CONDITIONS | frozenset(SEARCH[resource_type])
    for name, _ in pairs:
        if name not in known:
            raise QueryError(
                f"If-None-Exist: {name} is not a search parameter of {resource_type} here; "
                f"use one of {', '.join(sorted(known))}"
            )
    return build_query(resource_type, pairs, base=base)


def sort_matches(matches: list[Resource], sort: str | None) -> None:
    """Order results in place: by `start` (Oracle) or by lastUpdated, ascending or descending."""
    if sort == "start":
        matches.sort(key=lambda r: (parse_instant(r.get("start")) or LATEST, str(r.get("id"))))
    elif sort in ("_lastUpdated", "-_lastUpdated"):
        matches.sort(key=lambda r: last_updated(r) or datetime.min.replace(tzinfo=UTC), reverse=sort[0] == "-")
