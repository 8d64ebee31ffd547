"""Searches of the FHIR test server as a server in each mode parses them: which parameters it honours, the
vendor rules (`epic`, `cerner`), result order and page size. Pure: parameters in, a `Query` out.

Full mode searches every type in `fhir_params.SEARCH` with its parameters plus `_id`, `_count`,
`_lastUpdated`, `_sort=[-]_lastUpdated` and `_include=Appointment:patient`. The vendor modes imitate a
read API: Appointment, Patient and Consent only, with the parameters those vendors document.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from connector.fhir import last_updated, parse_instant
from connector.sandbox.fhir_params import PREFIXES, SEARCH, QueryError, parameter_test

Resource = dict[str, Any]
Pairs = list[tuple[str, str]]
MODES = ("full", "epic", "cerner")
Mode = Literal["full", "epic", "cerner"]

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
