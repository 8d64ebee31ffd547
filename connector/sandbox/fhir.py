"""A local FHIR R4 test server that versions, searches, pages, keeps history and notifies like a real one.

Search `GET [base]/{type}?…`: `_id`, `_count`, `_lastUpdated` (ge/gt/le/lt/eq, repeatable), `_sort=
[-]_lastUpdated`, `_include=Appointment:patient`; on Appointment also `date` (on `start`, prefixed and
repeatable to form a range), `patient`, `practitioner`, `location` (participant actors; comma lists) and
`status` (comma list). Result sets are snapshotted and paged with opaque `next` links; the `self` link
lists only the parameters that were honoured. `FhirState.mode` imitates a vendor: `epic` honours only
`patient`, `date`, `status`, `_count`, `_id` on Appointment and has no history and no Subscription;
`cerner` requires `_id` or one of patient|practitioner|location with `date` (400 otherwise), sorts by
`start` and has no history and no Subscription; both ignore `_lastUpdated`, `_sort` and `_include`.

History `GET [base]/{type}/_history?_since=&_count=` (and `[base]/_history`): newest first, one entry per
version or deletion, paged like search. `GET/PUT/DELETE [base]/{type}/{id}` and `POST [base]/{type}` keep
`meta.versionId` and `meta.lastUpdated` as a server does; `FhirState.put(resource, when=…)` may write an
older `lastUpdated` than what is visible (a late commit). Resources are stored as given (no validation),
so tests can plant invalid ones. Subscriptions (R4 classic and Backport): see `fhir_subscriptions`.

Test controls (not FHIR):
    POST /_test/faults     replaces the whole fault profile; absent knobs return to their defaults:
                           {"malformed_pages": 1, "page_status": [200, 503], "ignore": ["_sort"],
                            "latency_ms": 0, "read_status": 0, "mode": "full", "flaky": 0.0, "seed": null,
                            "fail_next": [503], "drop_notifications": 0, "subscription_error": false,
                            "next_loop": false, "endless_pages": false, "huge_bundle_mb": 0,
                            "drip_seconds": 0, "next_origin": null}
                           (the last five are hostile pages: see `fhir_hostile`)
    POST /_test/reset      forget every resource, version, subscription and queued notification
    POST /_test/flush      wait until every queued notification has been sent (or failed)
    POST /_test/heartbeat  send a heartbeat to every active Backport subscription
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import random
import re
import secrets
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from connector.fhir import last_updated, parse_instant, reference_id
from connector.sandbox.fhir_hostile import Hostility
from connector.sandbox.fhir_subscriptions import SubscriptionError, Subscriptions

FHIR_JSON = "application/fhir+json"
SEARCHABLE = ("Appointment", "Patient", "Consent")
MODES = ("full", "epic", "cerner")
Mode = Literal["full", "epic", "cerner"]
Resource = dict[str, Any]
Pairs = list[tuple[str, str]]

COMMON = frozenset({"_id", "_count", "_lastUpdated", "_sort", "_include"})
PARAMETERS = {
    "Appointment": frozenset({"date", "patient", "practitioner", "location", "status"}),
    "Consent": frozenset({"patient", "status"}),
    "Patient": frozenset[str](),
}
VENDOR_IGNORED = frozenset({"_lastUpdated", "_sort", "_include"})
EPIC_APPOINTMENT = frozenset({"patient", "date", "status", "_count", "_id"})
ACTORS = {"patient": "Patient", "practitioner": "Practitioner", "location": "Location"}
PARAMETER_TYPES = {
    "_id": "token",
    "_lastUpdated": "date",
    "date": "date",
    "status": "token",
    "patient": "reference",
    "practitioner": "reference",
    "location": "reference",
}
PREFIXES = ("ge", "gt", "le", "lt", "eq")
DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
LATEST = datetime.max.replace(tzinfo=UTC)


class FhirJson(JSONResponse):
    """JSON as many servers write it, every non-ASCII character escaped (`\\u00e9`): a lone surrogate that a
    test planted in a resource goes out as the escape `\\ud800`, which a client's parser reads back as it."""

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def instant(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- search: pure ---------------------------------------------------------------------------------------


class QueryError(ValueError):
    """A search the server refuses with 400; the text names the parameter and the accepted form."""


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


def honoured(resource_type: str, mode: str, pairs: Pairs) -> frozenset[str]:
    """The parameter names a server in `mode` uses for this search; all others are silently ignored."""
    names = COMMON | PARAMETERS.get(resource_type, frozenset())
    if mode == "full":
        return names
    if resource_type == "Appointment" and any(name == "_id" for name, _ in pairs):
        return frozenset({"_id", "_count"})  # Epic: "All others will be ignored"; Oracle: _id stands alone
    if mode == "epic" and resource_type == "Appointment":
        return EPIC_APPOINTMENT
    return names - VENDOR_IGNORED


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


def _wanted_ids(value: str, resource_type: str, base: str | None) -> set[str]:
    wanted: set[str] = set()
    for item in value.split(","):
        found = reference_id(item, resource_type, base) if "/" in item else item
        if found:
            wanted.add(found)
    return wanted


def _actors(resource: Resource) -> list[str]:
    """The participant actor references of an Appointment, in document order."""
    participants = resource.get("participant")
    references: list[str] = []
    for participant in participants if isinstance(participants, list) else []:
        actor = participant.get("actor") if isinstance(participant, dict) else None
        reference = actor.get("reference") if isinstance(actor, dict) else None
        if isinstance(reference, str):
            references.append(reference)
    return references


def _filter(resource_type: str, name: str, value: str, base: str | None) -> Callable[[Resource], bool]:
    if name == "_id":
        ids = set(value.split(","))
        return lambda r: r.get("id") in ids
    if name == "status":
        statuses = set(value.split(","))
        return lambda r: r.get("status") in statuses
    if name in ("_lastUpdated", "date"):
        test = date_test(value)
        return (
            (lambda r: test(last_updated(r)))
            if name == "_lastUpdated"
            else (lambda r: test(parse_instant(r.get("start"))))
        )
    kind = ACTORS[name]
    wanted = _wanted_ids(value, kind, base)
    if resource_type == "Consent":
        return lambda r: reference_id((r.get("patient") or {}).get("reference"), kind, base) in wanted
    return lambda r: any(reference_id(ref, kind, base) in wanted for ref in _actors(r))


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
            query.tests.append(_filter(resource_type, name, value, base))
            query.used.append((name, value))
    query.used.append(("_count", str(query.count)))
    return query


def _sort(matches: list[Resource], sort: str | None) -> None:
    if sort == "start":
        matches.sort(key=lambda r: (parse_instant(r.get("start")) or LATEST, str(r.get("id"))))
    elif sort in ("_lastUpdated", "-_lastUpdated"):
        matches.sort(key=lambda r: last_updated(r) or datetime.min.replace(tzinfo=UTC), reverse=sort[0] == "-")


# --- state ----------------------------------------------------------------------------------------------


@dataclass
class Change:
    """One history entry: a version written (POST = created, PUT = updated) or a deletion (no resource)."""

    sequence: int
    method: str
    resource_type: str
    resource_id: str
    version_id: str
    when: datetime
    resource: Resource | None


@dataclass
class Snapshot:
    """A result set frozen at query time, served page by page."""

    kind: str  # "searchset" (entries are resources) or "history" (entries are Bundle entries)
    entries: list[Resource]
    count: int
    include_patients: bool
    base: str
    self_url: str
    next_url: str  # + offset


@dataclass
class FhirState:
    resources: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    deleted: set[tuple[str, str]] = field(default_factory=set)  # adding here deletes silently (no history)
    snapshots: dict[str, Snapshot] = field(default_factory=dict)
    token: str | None = None  # bearer token required when set
    authorizer: Callable[[str], object] | None = None  # or: a check of the Authorization header (SMART)
    basic: tuple[str, str] | None = None  # (user, password) required when set
    malformed_pages: int = 0
    page_status: list[int] = field(default_factory=list)
    ignore: set[str] = field(default_factory=set)
    latency: float = 0.0
    requests: list[str] = field(default_factory=list)
    mode: Mode = "full"
    flaky: float = 0.0  # probability that a GET answers 503/429 (Retry-After: 1) or 500
    seed: int | None = None  # seeds the choice of flaky failures
    fail_next: list[int] = field(default_factory=list)  # statuses for the next requests (200: serve normally)
    read_status: int = 0  # when set, every read answers this status
    drop_notifications: int = 0  # the next N event notifications are counted but never sent
    subscription_error: bool = False  # $status and notifications report status `error`
    hostile: Hostility = field(default_factory=Hostility)  # loops, endless, huge or dripping pages
    notification_failures: list[dict[str, Any]] = field(default_factory=list)
    history: list[Change] = field(default_factory=list)
    base_url: str = "http://127.0.0.1"  # the base of the latest request, for absolute references
    subscriptions: Subscriptions = field(default_factory=Subscriptions)
    _last_stamp: datetime = field(default_factory=lambda: datetime(2000, 1, 1, tzinfo=UTC))
    _versions: dict[tuple[str, str], int] = field(default_factory=dict)
    _random: tuple[int | None, random.Random] | None = None

    def stamp(self) -> datetime:
        """A strictly increasing server time for meta.lastUpdated."""
        now = datetime.now(UTC).replace(microsecond=datetime.now(UTC).microsecond // 1000 * 1000)
        if now <= self._last_stamp:
            now = self._last_stamp + timedelta(milliseconds=1)
        self._last_stamp = now
        return now

    def put(self, resource: dict[str, Any], when: datetime | None = None) -> dict[str, Any]:
        """Store a new version of `resource` (its id is required) and return it with server meta.

        `when` sets meta.lastUpdated, even when older than versions already visible (a late commit). A
        Subscription gets the status the server gives it (SubscriptionError if unusable); other changes
        notify the matching subscriptions."""
        key = (resource["resourceType"], str(resource["id"]))
        if key[0] == "Subscription":
            resource = self.subscriptions.admit(self, resource)
        created = self.current(*key) is None
        stored = self.store(resource, when, "POST" if created else "PUT")
        self.subscriptions.written(self, stored, created)
        return stored

    def store(self, resource: Resource, when: datetime | None = None, method: str = "PUT") -> Resource:
        """Write a version and its history entry, without notifying anyone."""
        key = (resource["resourceType"], str(resource["id"]))
        moment = self._moment(when)
        version = self._next_version(key)
        stored = copy.deepcopy(resource)
        stored["meta"] = {**(stored.get("meta") or {}), "versionId": version, "lastUpdated": instant(moment)}
        self.resources.setdefault(key, []).append(stored)
        self.deleted.discard(key)
        self.history.append(Change(len(self.history), method, *key, version, moment, stored))
        return stored

    def delete(self, resource_type: str, resource_id: str, when: datetime | None = None) -> bool:
        """Delete the resource, recording a DELETE version at `when` (default: now) that history shows.
        False when there is nothing to delete."""
        last = self.current(resource_type, resource_id)
        if last is None:
            return False
        key, moment = (resource_type, resource_id), self._moment(when)
        self.deleted.add(key)
        self.history.append(Change(len(self.history), "DELETE", *key, self._next_version(key), moment, None))
        self.subscriptions.deleted(self, last, instant(moment))
        return True

    def current(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        key = (resource_type, resource_id)
        if key in self.deleted or key not in self.resources:
            return None
        return self.resources[key][-1]

    def load(self, resources: list[dict[str, Any]]) -> None:
        for resource in resources:
            if resource.get("resourceType") == "Bundle":
                self.load([e["resource"] for e in resource.get("entry") or [] if e.get("resource")])
            elif resource.get("id"):
                self.put(resource)

    def reset(self) -> None:
        """Forget every resource, version, snapshot and subscription (faults stay)."""
        for store in (self.resources, self.snapshots, self._versions):
            store.clear()
        self.deleted.clear()
        self.history.clear()
        self.notification_failures.clear()
        self.subscriptions.clear()

    def criteria_matches(self, criteria: str, resource: Resource) -> bool:
        """Whether `resource` matches a search string such as `Appointment?status=booked` (full semantics)."""
        resource_type, _, query = criteria.partition("?")
        if resource_type != resource.get("resourceType"):
            return False
        return build_query(resource_type, parse_qsl(query), base=self.base_url).matches(resource)

    def check_criteria(self, criteria: str) -> None:
        """Raise QueryError for a search string this server could not evaluate."""
        resource_type, _, query = criteria.partition("?")
        if resource_type not in SEARCHABLE:
            raise QueryError(f"criteria must search one of {', '.join(SEARCHABLE)}")
        build_query(resource_type, parse_qsl(query))

    def injected_status(self, read: bool) -> int:
        """The failure to answer instead of this request, or 0: `fail_next` first (any request), then
        `flaky` (reads only)."""
        if self.fail_next:
            status = self.fail_next.pop(0)
            return 0 if status == 200 else status
        if not read or self.flaky <= 0:
            return 0
        if self._random is None or self._random[0] != self.seed:
            self._random = (self.seed, random.Random(self.seed))
        chooser = self._random[1]
        return chooser.choice((503, 429, 500)) if chooser.random() < self.flaky else 0

    def _moment(self, when: datetime | None) -> datetime:
        moment = when or self.stamp()
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        return moment.replace(microsecond=moment.microsecond // 1000 * 1000)

    def _next_version(self, key: tuple[str, str]) -> str:
        number = max(self._versions.get(key, 0), len(self.resources.get(key, []))) + 1
        self._versions[key] = number
        return str(number)


# --- HTTP -----------------------------------------------------------------------------------------------


def _outcome(status: int, code: str, text: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]},
        status_code=status,
        media_type=FHIR_JSON,
        headers=headers,
    )


def _injected(status: int) -> JSONResponse:
    code = {429: "throttled", 500: "exception"}.get(status, "transient")
    retry = {"Retry-After": "1"} if status in (429, 503) else None
    return _outcome(status, code, "injected failure", retry)


def _history_entry(change: Change, base: str) -> Resource:
    url = f"{change.resource_type}/{change.resource_id}"
    entry: Resource = {"fullUrl": f"{base}/{url}", "request": {"method": change.method, "url": url}}
    if change.resource is None:
        entry["response"] = {"status": "204", "lastModified": instant(change.when)}
    else:
        entry["resource"] = copy.deepcopy(change.resource)
        entry["response"] = {
            "status": "201" if change.method == "POST" else "200",
            "etag": f'W/"{change.version_id}"',
            "lastModified": instant(change.when),
        }
    return entry


def capability(mode: str) -> Resource:
    """The CapabilityStatement of a server in `mode`: what it searches, whether it keeps history."""
    resources: list[Resource] = []
    for resource_type in SEARCHABLE:
        codes = ["read", "search-type"] + (["history-type"] if mode == "full" else [])
        names = sorted(n for n in honoured(resource_type, mode, []) if n in PARAMETER_TYPES)
        resources.append(
            {
                "type": resource_type,
                "interaction": [{"code": c} for c in codes],
                "searchParam": [{"name": n, "type": PARAMETER_TYPES[n]} for n in names],
            }
        )
    if mode == "full":
        resources.append(
            {"type": "Subscription", "interaction": [{"code": c} for c in ("read", "create", "update", "delete")]}
        )
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{"mode": "server", "resource": resources}],
    }


def _faults(state: FhirState, body: Any) -> None:
    """Replace the whole fault profile; absent knobs return to their defaults."""
    if not isinstance(body, dict):
        raise TypeError("the fault profile is a JSON object")
    mode = body.get("mode", "full")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    state.mode = cast(Mode, mode)
    state.malformed_pages = int(body.get("malformed_pages", 0))
    state.page_status = [int(s) for s in body.get("page_status", [])]
    state.ignore = set(body.get("ignore", []))
    state.latency = float(body.get("latency_ms", 0)) / 1000
    state.read_status = int(body.get("read_status", 0))
    state.flaky = min(1.0, max(0.0, float(body.get("flaky", 0.0))))
    state.seed = None if body.get("seed") is None else int(body["seed"])
    state.fail_next = [int(s) for s in body.get("fail_next", [])]
    state.drop_notifications = int(body.get("drop_notifications", 0))
    state.subscription_error = bool(body.get("subscription_error", False))
    state.hostile = Hostility.from_profile(body)


def create_app(state: FhirState) -> Starlette:
    def authorised(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        if state.authorizer is not None:
            return bool(state.authorizer(header))
        if state.token is not None:
            return secrets.compare_digest(header, f"Bearer {state.token}")
        if state.basic is not None:
            expected = base64.b64encode(f"{state.basic[0]}:{state.basic[1]}".encode()).decode()
            return secrets.compare_digest(header, f"Basic {expected}")
        return True

    async def guard(request: Request) -> Response | None:
        state.requests.append(f"{request.method} {request.url.path}?{request.url.query}")
        state.base_url = str(request.base_url).rstrip("/")
        state.subscriptions.outbox.attach()
        if state.latency:
            await asyncio.sleep(state.latency)
        if not authorised(request):
            return _outcome(401, "login", "authentication required")
        if status := state.injected_status(read=request.method == "GET"):
            return _injected(status)
        return None

    def no_subscriptions() -> Response:
        return _outcome(404, "not-supported", f"Subscription is not supported by this server ({state.mode})")

    def page_response(request: Request, token: str, offset: int) -> Response:
        snapshot = state.snapshots.get(token)
        if snapshot is None:
            return _outcome(410, "not-found", "this result page has expired")
        status = state.page_status.pop(0) if state.page_status else 200  # 200 = serve this page normally
        if status != 200:
            return _outcome(status, "transient", "injected failure")
        chunk = snapshot.entries[offset : offset + snapshot.count]
        endless = state.hostile.endless_pages and snapshot.kind == "searchset"
        if endless and len(chunk) < snapshot.count:
            chunk = chunk + state.hostile.invented(offset + len(chunk), snapshot.count - len(chunk))
        if snapshot.kind == "history":
            entries = chunk
        else:
            entries = [
                {
                    "fullUrl": f"{snapshot.base}/{r['resourceType']}/{r['id']}",
                    "resource": r,
                    "search": {"mode": "match"},
                }
                for r in chunk
            ]
            if snapshot.include_patients:
                entries += included_patients(chunk, snapshot.base)
        links = [{"relation": "self", "url": snapshot.self_url}]
        more = endless or offset + snapshot.count < len(snapshot.entries)
        next_url = state.hostile.next_link(
            f"{snapshot.next_url}{offset + snapshot.count}" if more else None, str(request.url)
        )
        if next_url is not None:
            links.append({"relation": "next", "url": next_url})
        bundle = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": snapshot.kind,
            "meta": {"lastUpdated": datetime.now(UTC).isoformat()},
            "total": len(snapshot.entries),
            "link": links,
            "entry": entries,
        }
        if (hostile := state.hostile.streamed(bundle)) is not None:
            return hostile
        if state.malformed_pages:
            state.malformed_pages -= 1
            return Response(json.dumps(bundle)[:-40], media_type=FHIR_JSON)
        return FhirJson(bundle)

    def included_patients(chunk: list[Resource], base: str) -> list[Resource]:
        entries: list[Resource] = []
        seen: set[str] = set()
        for resource in chunk:
            for reference in _actors(resource):
                patient_id = reference_id(reference, "Patient")
                patient = state.current("Patient", patient_id) if patient_id else None
                if patient_id and patient is not None and patient_id not in seen:
                    seen.add(patient_id)
                    entries.append(
                        {"fullUrl": f"{base}/Patient/{patient_id}", "resource": patient, "search": {"mode": "include"}}
                    )
        return entries

    async def search(request: Request) -> Response:
        if (denied := await guard(request)) is not None:
            return denied
        resource_type = request.path_params["type"]
        if resource_type not in SEARCHABLE:
            return _outcome(404, "not-supported", f"{resource_type} is not searchable here")
        base = state.base_url
        try:
            query = build_query(resource_type, request.query_params.multi_items(), state.mode, state.ignore, base)
        except QueryError as exc:
            return _outcome(400, "invalid", str(exc))
        ids = [i for name, value in query.used if name == "_id" for i in value.split(",")]
        keys = (
            [(resource_type, i) for i in dict.fromkeys(ids)]
            if ids
            else [key for key in state.resources if key[0] == resource_type]
        )  # `_id` looks up, like a server's index
        matches = [
            state.resources[key][-1]
            for key in keys
            if key in state.resources and key not in state.deleted and query.matches(state.resources[key][-1])
        ]
        _sort(matches, query.sort)
        token = uuid.uuid4().hex
        state.snapshots[token] = Snapshot(
            "searchset",
            [copy.deepcopy(m) for m in matches],
            query.count,
            query.include_patients,
            base,
            f"{base}/{resource_type}?{urlencode(query.used)}",
            f"{base}/_page?token={token}&offset=",
        )
        return page_response(request, token, 0)

    async def next_page(request: Request) -> Response:
        if (denied := await guard(request)) is not None:
            return denied
        try:
            offset = int(request.query_params.get("offset", "0"))
        except ValueError:
            return _outcome(400, "invalid", "bad offset")
        return page_response(request, request.query_params.get("token", ""), offset)

    async def history(request: Request) -> Response:
        if (denied := await guard(request)) is not None:
            return denied
        resource_type: str | None = request.path_params.get("type")
        if state.mode != "full":
            return _outcome(404, "not-supported", f"history is not supported by this server ({state.mode})")
        if resource_type is not None and resource_type not in SEARCHABLE:
            return _outcome(404, "not-supported", f"{resource_type} has no history here")
        params, base = request.query_params, state.base_url
        if "_page" in params:
            offset = params.get("_offset", "0")
            if not offset.isdigit():
                return _outcome(400, "invalid", "bad _offset")
            return page_response(request, params["_page"], int(offset))
        used: Pairs = []
        since = parse_instant(params.get("_since"))
        if "_since" in params:
            if since is None:
                return _outcome(400, "invalid", "_since must be an instant such as 2026-11-20T10:00:00Z")
            used.append(("_since", params["_since"]))
        try:
            count = max(1, min(int(params.get("_count", "20")), 500))
        except ValueError:
            return _outcome(400, "invalid", "_count must be a number")
        used.append(("_count", str(count)))
        changes = sorted(
            (
                c
                for c in state.history
                if resource_type in (None, c.resource_type) and (since is None or c.when >= since)
            ),
            key=lambda c: (c.when, c.sequence),
            reverse=True,
        )
        token = uuid.uuid4().hex
        self_url = f"{base}/{resource_type + '/' if resource_type else ''}_history?{urlencode(used)}"
        state.snapshots[token] = Snapshot(
            "history",
            [_history_entry(c, base) for c in changes],
            count,
            False,
            base,
            self_url,
            f"{self_url}&_page={token}&_offset=",
        )
        return page_response(request, token, 0)

    async def read_body(request: Request) -> Resource | Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _outcome(400, "invalid", "body is not JSON")
        return body if isinstance(body, dict) else _outcome(400, "invalid", "body is not a FHIR resource")

    def write(body: Resource) -> Response:
        created = state.current(body["resourceType"], body["id"]) is None
        try:
            stored = state.put(body)
        except SubscriptionError as exc:
            return _outcome(400, "invalid", str(exc))
        return JSONResponse(
            stored,
            status_code=201 if created else 200,
            media_type=FHIR_JSON,
            headers={"ETag": f'W/"{stored["meta"]["versionId"]}"'},
        )

    async def instance(request: Request) -> Response:
        if (denied := await guard(request)) is not None:
            return denied
        rtype, rid = request.path_params["type"], request.path_params["id"]
        if rtype == "Subscription" and state.mode != "full":
            return no_subscriptions()
        if request.method == "GET":
            if state.read_status:
                return _outcome(state.read_status, "transient", "injected read failure")
            resource = state.current(rtype, rid)
            if resource is None:
                gone = (rtype, rid) in state.deleted
                return _outcome(410 if gone else 404, "deleted" if gone else "not-found", f"{rtype}/{rid}")
            return FhirJson(resource, headers={"ETag": f'W/"{resource["meta"]["versionId"]}"'})
        if request.method == "DELETE":
            state.delete(rtype, rid)
            return Response(status_code=204)
        body = await read_body(request)
        if isinstance(body, Response):
            return body
        body.update(resourceType=rtype, id=rid)
        return write(body)

    async def create(request: Request) -> Response:
        if (denied := await guard(request)) is not None:
            return denied
        if request.path_params["type"] == "Subscription" and state.mode != "full":
            return no_subscriptions()
        body = await read_body(request)
        if isinstance(body, Response):
            return body
        body.update(resourceType=request.path_params["type"], id=str(uuid.uuid4()))
        return write(body)

    async def subscription_status(request: Request) -> Response:
        if (denied := await guard(request)) is not None:
            return denied
        if state.mode != "full":
            return no_subscriptions()
        wanted = request.path_params.get("id")
        ids = [wanted] if wanted else [rid for (rtype, rid) in state.resources if rtype == "Subscription"]
        bundle = state.subscriptions.status_bundle(state, ids)
        if wanted and not bundle["entry"]:
            return _outcome(404, "not-found", f"Subscription/{wanted}")
        return JSONResponse(bundle, media_type=FHIR_JSON)

    async def metadata(request: Request) -> Response:
        return JSONResponse(capability(state.mode), media_type=FHIR_JSON)

    async def faults(request: Request) -> Response:
        try:
            _faults(state, json.loads(await request.body() or b"{}"))
        except (ValueError, TypeError) as exc:
            return JSONResponse({"ok": False, "error": str(exc)}, status_code=400)
        return JSONResponse({"ok": True})

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    async def flush(request: Request) -> Response:
        done = await state.subscriptions.outbox.flush()
        return JSONResponse(
            {"ok": done, "failures": len(state.notification_failures)}, status_code=200 if done else 504
        )

    async def heartbeat(request: Request) -> Response:
        state.subscriptions.outbox.attach()
        return JSONResponse({"subscriptions": state.subscriptions.heartbeat(state)})

    return Starlette(
        routes=[
            Route("/_test/faults", faults, methods=["POST"]),
            Route("/_test/reset", reset, methods=["POST"]),
            Route("/_test/flush", flush, methods=["POST"]),
            Route("/_test/heartbeat", heartbeat, methods=["POST"]),
            Route("/metadata", metadata, methods=["GET"]),
            Route("/_page", next_page, methods=["GET"]),
            Route("/_history", history, methods=["GET"]),
            Route("/Subscription/$status", subscription_status, methods=["GET"]),
            Route("/Subscription/{id}/$status", subscription_status, methods=["GET"]),
            Route("/{type}", search, methods=["GET"]),
            Route("/{type}", create, methods=["POST"]),
            Route("/{type}/_history", history, methods=["GET"]),
            Route("/{type}/{id}", instance, methods=["GET", "PUT", "DELETE"]),
        ]
    )
