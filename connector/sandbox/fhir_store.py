"""The FHIR test server's state: every version of every resource, the history, the fault knobs, and the
writes it was asked to make.

Versions are kept as a server keeps them: each write stores a new version with `meta.versionId` and a
strictly increasing `meta.lastUpdated`, and a history entry. Python writes (`put`, `store`, `delete`) are
not validated, so tests can plant invalid resources; the HTTP interface validates (see `fhir_writes`).
Every change and every check-then-write (`create` with a condition, `update`/`remove` with `If-Match`)
runs under one lock, so two conditional creates at the same moment store one resource, whether they come
from the server's event loop or from a test's thread.
"""

from __future__ import annotations

import copy
import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

from connector.sandbox.fhir_hostile import Hostility
from connector.sandbox.fhir_search import Mode, Query, QueryError, build_query, searchable
from connector.sandbox.fhir_subscriptions import Subscriptions

Resource = dict[str, Any]
Key = tuple[str, str]


def instant(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PreconditionFailed(Exception):
    """A conditional interaction whose condition does not hold (412); the text says which and why."""


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
    resource_type: str | None = None  # what was searched; None: the whole server's history
    interaction: str = "search"  # the scope its pages need: search, or read for one resource's history


@dataclass(frozen=True)
class WriteFault:
    """How the server fails one write request: `status` (0: answer normally), `after_commit` (the write is
    stored first: the answer is lost, not the write), `hang` (seconds to hold the answer, a client timeout)."""

    status: int = 0
    after_commit: bool = False
    hang: float = 0.0


@dataclass(frozen=True)
class WriteRecord:
    """One write asked of the server over HTTP and what became of it (for tests to inspect)."""

    interaction: str  # create | update | delete
    resource_type: str
    resource_id: str | None  # None when nothing was stored or found
    status: int  # the status the server answered
    version_id: str | None = None
    if_none_exist: str | None = None
    if_match: str | None = None


@dataclass
class FhirState:
    resources: dict[Key, list[dict[str, Any]]] = field(default_factory=dict)
    deleted: set[Key] = field(default_factory=set)  # adding here deletes silently (no history)
    snapshots: dict[str, Snapshot] = field(default_factory=dict)
    token: str | None = None  # bearer token required when set
    authorizer: Callable[[str], object] | None = None  # or: a check of the Authorization header (SMART)
    enforce_scopes: bool = False  # with `authorizer`: each interaction needs its SMART system scope (403)
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
    write_faults: list[WriteFault] = field(default_factory=list)  # how the next write requests fail
    conditional_create: bool = True  # False: If-None-Exist is ignored, as by servers without it
    read_status: int = 0  # when set, every read answers this status
    drop_notifications: int = 0  # the next N event notifications are counted but never sent
    subscription_error: bool = False  # $status and notifications report status `error`
    hostile: Hostility = field(default_factory=Hostility)  # loops, endless, huge or dripping pages
    notification_failures: list[dict[str, Any]] = field(default_factory=list)
    history: list[Change] = field(default_factory=list)
    writes: list[WriteRecord] = field(default_factory=list)  # HTTP writes, in the order they were answered
    base_url: str = "http://127.0.0.1"  # the base of the latest request, for absolute references
    subscriptions: Subscriptions = field(default_factory=Subscriptions)
    _last_stamp: datetime = field(default_factory=lambda: datetime(2000, 1, 1, tzinfo=UTC))
    _versions: dict[Key, int] = field(default_factory=dict)
    _random: tuple[int | None, random.Random] | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def stamp(self) -> datetime:
        """A strictly increasing server time for meta.lastUpdated."""
        now = datetime.now(UTC).replace(microsecond=datetime.now(UTC).microsecond // 1000 * 1000)
        if now <= self._last_stamp:
            now = self._last_stamp + timedelta(milliseconds=1)
        self._last_stamp = now
        return now

    # --- writing ----------------------------------------------------------------------------------------

    def put(self, resource: dict[str, Any], when: datetime | None = None) -> dict[str, Any]:
        """Store a new version of `resource` (its id is required) and return it with server meta.

        `when` sets meta.lastUpdated, even when older than versions already visible (a late commit). A
        Subscription gets the status the server gives it (SubscriptionError if unusable); other changes
        notify the matching subscriptions."""
        with self._lock:
            key = (resource["resourceType"], str(resource["id"]))
            if key[0] == "Subscription":
                resource = self.subscriptions.admit(self, resource)
            created = self.current(*key) is None
            stored = self.store(resource, when, "POST" if created else "PUT")
            self.subscriptions.written(self, stored, created)
            return stored

    def store(self, resource: Resource, when: datetime | None = None, method: str = "PUT") -> Resource:
        """Write a version and its history entry, without notifying anyone."""
        with self._lock:
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
        with self._lock:
            last = self.current(resource_type, resource_id)
            if last is None:
                return False
            key, moment = (resource_type, resource_id), self._moment(when)
            self.deleted.add(key)
            self.history.append(Change(len(self.history), "DELETE", *key, self._next_version(key), moment, None))
            self.subscriptions.deleted(self, last, instant(moment))
            return True

    def create(self, resource: Resource, condition: Query | None = None) -> tuple[Resource, bool]:
        """Store `resource` under a new server-assigned id: (stored, True). With a condition (If-None-Exist),
        one current match is returned instead and nothing is stored: (match, False); several matches raise
        PreconditionFailed. The search and the write happen under one lock."""
        with self._lock:
            if condition is not None:
                found = self.matching(resource["resourceType"], condition)
                if len(found) > 1:
                    raise PreconditionFailed(
                        f"If-None-Exist matches {len(found)} {resource['resourceType']} resources; "
                        "make the condition specific to one (e.g. identifier=system|value)"
                    )
                if found:
                    return found[0], False
            return self.put({**resource, "id": str(uuid.uuid4())}), True

    def update(self, resource: Resource, if_match: str | None = None) -> tuple[Resource, bool]:
        """Store a new version of `resource`: (stored, created). With `if_match` (a versionId, or `*` for any
        current version) the current version must be that one, else PreconditionFailed."""
        with self._lock:
            self._check_version(resource["resourceType"], str(resource["id"]), if_match)
            created = self.current(resource["resourceType"], str(resource["id"])) is None
            return self.put(resource), created

    def remove(self, resource_type: str, resource_id: str, if_match: str | None = None) -> bool:
        """`delete` after the same version check as `update`."""
        with self._lock:
            self._check_version(resource_type, resource_id, if_match)
            return self.delete(resource_type, resource_id)

    def load(self, resources: list[dict[str, Any]]) -> None:
        for resource in resources:
            if resource.get("resourceType") == "Bundle":
                self.load([e["resource"] for e in resource.get("entry") or [] if e.get("resource")])
            elif resource.get("id"):
                self.put(resource)

    def reset(self) -> None:
        """Forget every resource, version, snapshot, subscription and recorded write (faults stay)."""
        with self._lock:
            for store in (self.resources, self.snapshots, self._versions):
                store.clear()
            self.deleted.clear()
            self.history.clear()
            self.writes.clear()
            self.notification_failures.clear()
            self.subscriptions.clear()

    # --- reading ----------------------------------------------------------------------------------------

    def current(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        key = (resource_type, resource_id)
        if key in self.deleted or key not in self.resources:
            return None
        return self.resources[key][-1]

    def versions(self, resource_type: str, resource_id: str) -> list[Resource]:
        """Every stored version of one resource, oldest first (a deletion leaves no version here)."""
        return list(self.resources.get((resource_type, resource_id), []))

    def of_type(self, resource_type: str) -> list[Resource]:
        """The current version of every live resource of a type, in the order they were first written."""
        with self._lock:
            return [v[-1] for k, v in self.resources.items() if k[0] == resource_type and k not in self.deleted]

    def matching(self, resource_type: str, query: Query) -> list[Resource]:
        """The current resources of a type that a parsed search matches (unsorted)."""
        with self._lock:
            ids = query.ids()
            keys = [(resource_type, i) for i in ids] if ids else [k for k in self.resources if k[0] == resource_type]
            found = (self.current(*key) for key in keys)
            return [resource for resource in found if resource is not None and query.matches(resource)]

    def search(self, resource_type: str, params: str = "") -> list[Resource]:
        """What `GET [base]/{type}?{params}` matches with full semantics, e.g.
        `state.search("Communication", "identifier=urn:example|n-1&about=Appointment/a1")`."""
        query = build_query(resource_type, parse_qsl(params, keep_blank_values=True), base=self.base_url)
        return self.matching(resource_type, query)

    def criteria_matches(self, criteria: str, resource: Resource) -> bool:
        """Whether `resource` matches a search string such as `Appointment?status=booked` (full semantics)."""
        resource_type, _, query = criteria.partition("?")
        if resource_type != resource.get("resourceType"):
            return False
        return build_query(resource_type, parse_qsl(query), base=self.base_url).matches(resource)

    def check_criteria(self, criteria: str) -> None:
        """Raise QueryError for a search string this server could not evaluate."""
        resource_type, _, query = criteria.partition("?")
        if resource_type not in searchable("full"):
            raise QueryError(f"criteria must search one of {', '.join(searchable('full'))}")
        build_query(resource_type, parse_qsl(query))

    # --- faults -----------------------------------------------------------------------------------------

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

    def next_write_fault(self) -> WriteFault:
        """How the write being answered fails (consumed), or a fault that changes nothing."""
        with self._lock:
            return self.write_faults.pop(0) if self.write_faults else WriteFault()

    def _check_version(self, resource_type: str, resource_id: str, if_match: str | None) -> None:
        if if_match is None:
            return
        current = self.current(resource_type, resource_id)
        if current is None:
            raise PreconditionFailed(f"If-Match: {resource_type}/{resource_id} has no current version")
        version = str(current["meta"]["versionId"])
        if if_match not in ("*", version):
            raise PreconditionFailed(
                f"If-Match: {resource_type}/{resource_id} is at version {version}, not {if_match}; "
                "read it again and decide on the current version"
            )

    def _moment(self, when: datetime | None) -> datetime:
        moment = when or self.stamp()
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        return moment.replace(microsecond=moment.microsecond // 1000 * 1000)

    def _next_version(self, key: Key) -> str:
        number = max(self._versions.get(key, 0), len(self.resources.get(key, []))) + 1
        self._versions[key] = number
        return str(number)
