"""A local FHIR R4 test server that versions, searches and pages like a real one.

Serves `GET [base]/{type}?…` with `_lastUpdated` (ge/gt/le/lt/eq, repeatable), `_id`, `_count`, `_sort=
_lastUpdated` and `_include=Appointment:patient`; result sets are snapshotted and paged with opaque `next`
links; the `self` link lists only the parameters that were honoured. `GET/PUT/DELETE [base]/{type}/{id}`
and `POST [base]/{type}` keep `meta.versionId` and `meta.lastUpdated` as a server does. Resources are
stored as given (no validation), so tests can plant invalid ones.

Test controls (not FHIR):
    POST /_test/faults   {"malformed_pages": 1, "page_status": [200, 503], "ignore": ["_sort"],
                          "latency_ms": 0, "read_status": 0}
    POST /_test/reset    forget every resource
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from connector.fhir import last_updated, parse_instant, reference_id

FHIR_JSON = "application/fhir+json"
SEARCHABLE = ("Appointment", "Patient", "Consent")


@dataclass
class FhirState:
    resources: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    deleted: set[tuple[str, str]] = field(default_factory=set)
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    token: str | None = None  # bearer token required when set
    authorizer: Callable[[str], object] | None = None  # or: a check of the Authorization header (SMART)
    basic: tuple[str, str] | None = None  # (user, password) required when set
    malformed_pages: int = 0
    page_status: list[int] = field(default_factory=list)
    ignore: set[str] = field(default_factory=set)
    latency: float = 0.0
    requests: list[str] = field(default_factory=list)
    _last_stamp: datetime = field(default_factory=lambda: datetime(2000, 1, 1, tzinfo=UTC))

    def stamp(self) -> datetime:
        """A strictly increasing server time for meta.lastUpdated."""
        now = datetime.now(UTC).replace(microsecond=datetime.now(UTC).microsecond // 1000 * 1000)
        if now <= self._last_stamp:
            now = self._last_stamp + timedelta(milliseconds=1)
        self._last_stamp = now
        return now

    def put(self, resource: dict[str, Any], when: datetime | None = None) -> dict[str, Any]:
        """Store a new version of `resource` (its id is required) and return it with server meta."""
        key = (resource["resourceType"], str(resource["id"]))
        versions = self.resources.setdefault(key, [])
        stored = copy.deepcopy(resource)
        moment = when or self.stamp()
        stored["meta"] = {**(stored.get("meta") or {}), "versionId": str(len(versions) + 1),
                          "lastUpdated": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")}
        versions.append(stored)
        self.deleted.discard(key)
        return stored

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


def _outcome(status: int, code: str, text: str) -> JSONResponse:
    return JSONResponse({"resourceType": "OperationOutcome",
                         "issue": [{"severity": "error", "code": code, "diagnostics": text}]},
                        status_code=status, media_type=FHIR_JSON)


def _matches_date(value: datetime | None, condition: str) -> bool:
    prefix, raw = (condition[:2], condition[2:]) if condition[:2] in ("ge", "gt", "le", "lt", "eq") \
        else ("eq", condition)
    bound = parse_instant(raw)
    if value is None or bound is None:
        return False
    return {"ge": value >= bound, "gt": value > bound, "le": value <= bound, "lt": value < bound,
            "eq": value == bound}[prefix]


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
        if state.latency:
            await asyncio.sleep(state.latency)
        if not authorised(request):
            return _outcome(401, "login", "authentication required")
        return None

    def page_response(request: Request, token: str, offset: int) -> Response:
        snapshot = state.snapshots.get(token)
        if snapshot is None:
            return _outcome(410, "not-found", "this result page has expired")
        status = state.page_status.pop(0) if state.page_status else 200  # 200 = serve this page normally
        if status != 200:
            return _outcome(status, "transient", "injected failure")
        count, matches = snapshot["count"], snapshot["matches"]
        chunk = matches[offset:offset + count]
        entries = [{"fullUrl": f"{snapshot['base']}/{r['resourceType']}/{r['id']}", "resource": r,
                    "search": {"mode": "match"}} for r in chunk]
        if snapshot["include_patients"]:
            seen: set[str] = set()
            for resource in chunk:
                participants = resource.get("participant")
                for participant in participants if isinstance(participants, list) else []:
                    if not isinstance(participant, dict):
                        continue
                    patient_id = reference_id((participant.get("actor") or {}).get("reference"), "Patient")
                    patient = state.current("Patient", patient_id) if patient_id else None
                    if patient is not None and patient_id not in seen:
                        seen.add(patient_id)  # type: ignore[arg-type]
                        entries.append({"fullUrl": f"{snapshot['base']}/Patient/{patient_id}",
                                        "resource": patient, "search": {"mode": "include"}})
        links = [{"relation": "self", "url": snapshot["self"]}]
        if offset + count < len(matches):
            links.append({"relation": "next",
                          "url": f"{snapshot['base']}/_page?token={token}&offset={offset + count}"})
        bundle = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "searchset",
                  "meta": {"lastUpdated": datetime.now(UTC).isoformat()},
                  "total": len(matches), "link": links, "entry": entries}
        if state.malformed_pages:
            state.malformed_pages -= 1
            return Response(json.dumps(bundle)[:-40], media_type=FHIR_JSON)
        return JSONResponse(bundle, media_type=FHIR_JSON)

    async def search(request: Request) -> Response:
        if (denied := await guard(request)) is not None:
            return denied
        resource_type = request.path_params["type"]
        if resource_type not in SEARCHABLE:
            return _outcome(404, "not-supported", f"{resource_type} is not searchable here")
        params = request.query_params
        used: list[tuple[str, str]] = []
        matches = [versions[-1] for (rtype, rid), versions in state.resources.items()
                   if rtype == resource_type and (rtype, rid) not in state.deleted]
        if "_lastUpdated" not in state.ignore:
            for condition in params.getlist("_lastUpdated"):
                matches = [r for r in matches if _matches_date(last_updated(r), condition)]
                used.append(("_lastUpdated", condition))
        if params.get("_id"):
            wanted = set(params["_id"].split(","))
            matches = [r for r in matches if r["id"] in wanted]
            used.append(("_id", params["_id"]))
        if resource_type == "Consent" and params.get("patient"):
            wanted_patient = params["patient"].removeprefix("Patient/")
            matches = [r for r in matches if reference_id((r.get("patient") or {}).get("reference"), "Patient")
                       == wanted_patient]
            used.append(("patient", params["patient"]))
        if resource_type == "Consent" and params.get("status"):
            matches = [r for r in matches if r.get("status") in params["status"].split(",")]
            used.append(("status", params["status"]))
        if params.get("_sort") in ("_lastUpdated", "-_lastUpdated") and "_sort" not in state.ignore:
            matches.sort(key=lambda r: last_updated(r) or datetime.min.replace(tzinfo=UTC),
                         reverse=params["_sort"].startswith("-"))
            used.append(("_sort", params["_sort"]))
        include = params.get("_include") == "Appointment:patient" and resource_type == "Appointment" \
            and "_include" not in state.ignore
        if include:
            used.append(("_include", "Appointment:patient"))
        try:
            count = max(1, min(int(params.get("_count", "20")), 500))
        except ValueError:
            return _outcome(400, "invalid", "_count must be a number")
        used.append(("_count", str(count)))
        base = str(request.base_url).rstrip("/")
        token = uuid.uuid4().hex
        state.snapshots[token] = {"matches": [copy.deepcopy(m) for m in matches], "count": count,
                                  "include_patients": include, "base": base,
                                  "self": f"{base}/{resource_type}?{urlencode(used)}"}
        return page_response(request, token, 0)

    async def next_page(request: Request) -> Response:
        if (denied := await guard(request)) is not None:
            return denied
        try:
            offset = int(request.query_params.get("offset", "0"))
        except ValueError:
            return _outcome(400, "invalid", "bad offset")
        return page_response(request, request.query_params.get("token", ""), offset)

    async def instance(request: Request) -> Response:
        if (denied := await guard(request)) is not None:
            return denied
        rtype, rid = request.path_params["type"], request.path_params["id"]
        if request.method == "GET":
            resource = state.current(rtype, rid)
            if resource is None:
                gone = (rtype, rid) in state.deleted
                return _outcome(410 if gone else 404, "deleted" if gone else "not-found", f"{rtype}/{rid}")
            return JSONResponse(resource, media_type=FHIR_JSON,
                                headers={"ETag": f'W/"{resource["meta"]["versionId"]}"'})
        if request.method == "DELETE":
            if state.current(rtype, rid) is not None:
                state.deleted.add((rtype, rid))
            return Response(status_code=204)
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _outcome(400, "invalid", "body is not JSON")
        body.update(resourceType=rtype, id=rid)
        stored = state.put(body)
        return JSONResponse(stored, status_code=200 if stored["meta"]["versionId"] != "1" else 201,
                            media_type=FHIR_JSON)

    async def create(request: Request) -> Response:
        if (denied := await guard(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _outcome(400, "invalid", "body is not JSON")
        body.update(resourceType=request.path_params["type"], id=str(uuid.uuid4()))
        return JSONResponse(state.put(body), status_code=201, media_type=FHIR_JSON)

    async def metadata(request: Request) -> Response:
        return JSONResponse({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                             "fhirVersion": "4.0.1", "format": ["json"],
                             "rest": [{"mode": "server", "resource": [
                                 {"type": t, "interaction": [{"code": "read"}, {"code": "search-type"}]}
                                 for t in SEARCHABLE]}]}, media_type=FHIR_JSON)

    async def faults(request: Request) -> Response:
        body = json.loads(await request.body() or b"{}")
        state.malformed_pages = int(body.get("malformed_pages", 0))
        state.page_status = list(body.get("page_status", []))
        state.ignore = set(body.get("ignore", []))
        state.latency = float(body.get("latency_ms", 0)) / 1000
        return JSONResponse({"ok": True})

    async def reset(request: Request) -> Response:
        state.resources.clear()
        state.deleted.clear()
        state.snapshots.clear()
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/_test/faults", faults, methods=["POST"]),
        Route("/_test/reset", reset, methods=["POST"]),
        Route("/metadata", metadata, methods=["GET"]),
        Route("/_page", next_page, methods=["GET"]),
        Route("/{type}", search, methods=["GET"]),
        Route("/{type}", create, methods=["POST"]),
        Route("/{type}/{id}", instance, methods=["GET", "PUT", "DELETE"]),
    ])
