"""The FHIR test server's Bundles and CapabilityStatement: search and history results frozen in snapshots and
served page by page, with the page faults and hostile pages of the fault profile."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from starlette.responses import Response

from connector.fhir import reference_id
from connector.sandbox.fhir_responses import FHIR_JSON, FhirJson, outcome
from connector.sandbox.fhir_search import (
    CONDITIONS,
    SEARCH,
    Pairs,
    Query,
    actors,
    honoured,
    parameter_type,
    searchable,
    sort_matches,
)
from connector.sandbox.fhir_store import Change, FhirState, Snapshot, instant

Resource = dict[str, Any]


def history_entry(change: Change, base: str) -> Resource:
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


def search_snapshot(state: FhirState, resource_type: str, query: Query) -> str:
    """Freeze the matches of a search; the token of its snapshot."""
    base = state.base_url
    matches = state.matching(resource_type, query)
    sort_matches(matches, query.sort)
    token = uuid.uuid4().hex
    state.snapshots[token] = Snapshot(
        "searchset",
        [copy.deepcopy(m) for m in matches],
        query.count,
        query.include_patients,
        base,
        f"{base}/{resource_type}?{urlencode(query.used)}",
        f"{base}/_page?token={token}&offset=",
        resource_type,
    )
    return token


def history_snapshot(state: FhirState, changes: list[Change], used: Pairs, count: int, where: str) -> str:
    """Freeze history entries (newest first) for `where` (`Type/` or `Type/id/` or empty); the token."""
    base = state.base_url
    token = uuid.uuid4().hex
    self_url = f"{base}/{where}_history?{urlencode(used)}"
    state.snapshots[token] = Snapshot(
        "history",
        [history_entry(c, base) for c in sorted(changes, key=lambda c: (c.when, c.sequence), reverse=True)],
        count,
        False,
        base,
        self_url,
        f"{self_url}&_page={token}&_offset=",
        where.split("/")[0] or None,
        "read" if where.count("/") == 2 else "search",
    )
    return token


def page(state: FhirState, this_url: str, token: str, offset: int) -> Response:
    """One page of a snapshot, with the page faults and hostile behaviours of the fault profile."""
    snapshot = state.snapshots.get(token)
    if snapshot is None:
        return outcome(410, "not-found", "this result page has expired")
    status = state.page_status.pop(0) if state.page_status else 200  # 200 = serve this page normally
    if status != 200:
        return outcome(status, "transient", "injected failure")
    chunk = snapshot.entries[offset : offset + snapshot.count]
    endless = state.hostile.endless_pages and snapshot.kind == "searchset"
    if endless and len(chunk) < snapshot.count:
        chunk = chunk + state.hostile.invented(offset + len(chunk), snapshot.count - len(chunk))
    if snapshot.kind == "history":
        entries = chunk
    else:
        entries = [
            {"fullUrl": f"{snapshot.base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
            for r in chunk
        ]
        if snapshot.include_patients:
            entries += included_patients(state, chunk, snapshot.base)
    links = [{"relation": "self", "url": snapshot.self_url}]
    more = endless or offset + snapshot.count < len(snapshot.entries)
    next_url = state.hostile.next_link(f"{snapshot.next_url}{offset + snapshot.count}" if more else None, this_url)
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


def included_patients(state: FhirState, chunk: list[Resource], base: str) -> list[Resource]:
    entries: list[Resource] = []
    seen: set[str] = set()
    for resource in chunk:
        for reference in actors(resource):
            patient_id = reference_id(reference, "Patient")
            patient = state.current("Patient", patient_id) if patient_id else None
            if patient_id and patient is not None and patient_id not in seen:
                seen.add(patient_id)
                entries.append(
                    {"fullUrl": f"{base}/Patient/{patient_id}", "resource": patient, "search": {"mode": "include"}}
                )
    return entries


WRITES = ("create", "update", "delete", "vread", "history-instance")


def capability(mode: str, conditional_create: bool = True) -> Resource:
    """The CapabilityStatement of a server in `mode`: what it searches and writes, whether it keeps history
    and creates conditionally. The vendor modes describe only the read API they imitate."""
    resources: list[Resource] = []
    for resource_type in searchable(mode):
        codes = ["read", "search-type"] + (["history-type", *WRITES] if mode == "full" else [])
        known = CONDITIONS | frozenset(SEARCH[resource_type])
        names = sorted(n for n in honoured(resource_type, mode, []) if n in known)
        entry: Resource = {
            "type": resource_type,
            "interaction": [{"code": c} for c in codes],
            "searchParam": [{"name": n, "type": parameter_type(resource_type, n)} for n in names],
        }
        if mode == "full":
            entry.update(versioning="versioned-update", readHistory=True, conditionalCreate=conditional_create)
        resources.append(entry)
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
