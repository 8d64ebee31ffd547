"""The FHIR test server's HTTP interface: authentication and SMART scopes, reads, searches, history, the
writes of `fhir_writes`, Subscription `$status`, the CapabilityStatement and the test controls."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from datetime import datetime
from typing import Any, cast

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from connector.fhir import parse_instant
from connector.sandbox import fhir_writes
from connector.sandbox.fhir_hostile import Hostility
from connector.sandbox.fhir_pages import capability, history_snapshot, page, search_snapshot
from connector.sandbox.fhir_responses import FHIR_JSON, FhirJson, injected, outcome, version_headers
from connector.sandbox.fhir_scopes import grants, needed
from connector.sandbox.fhir_search import MODES, Mode, Pairs, QueryError, build_query, searchable
from connector.sandbox.fhir_store import FhirState, WriteFault

INSTANCE = {"GET": "read", "PUT": "update", "DELETE": "delete"}


def write_fault(item: Any) -> WriteFault:
    """One entry of the profile's `write_faults`: {"status": 503, "after_commit": true, "hang_s": 5}."""
    if not isinstance(item, dict) or not set(item) <= {"status", "after_commit", "hang_s"}:
        raise ValueError('each write fault is an object with status, after_commit and/or hang_s, e.g. {"status": 503}')
    return WriteFault(int(item.get("status", 0)), bool(item.get("after_commit", False)), float(item.get("hang_s", 0)))


def apply_profile(state: FhirState, body: Any) -> None:
    """Replace the whole fault profile; absent knobs return to their defaults."""
    if not isinstance(body, dict):
        raise TypeError("the fault profile is a JSON object")
    mode = body.get("mode", "full")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    faults = [write_fault(item) for item in body.get("write_faults", [])]
    state.mode = cast(Mode, mode)
    state.malformed_pages = int(body.get("malformed_pages", 0))
    state.page_status = [int(s) for s in body.get("page_status", [])]
    state.ignore = set(body.get("ignore", []))
    state.latency = float(body.get("latency_ms", 0)) / 1000
    state.read_status = int(body.get("read_status", 0))
    state.flaky = min(1.0, max(0.0, float(body.get("flaky", 0.0))))
    state.seed = None if body.get("seed") is None else int(body["seed"])
    state.fail_next = [int(s) for s in body.get("fail_next", [])]
    state.write_faults = faults
    state.conditional_create = bool(body.get("conditional_create", True))
    state.drop_notifications = int(body.get("drop_notifications", 0))
    state.subscription_error = bool(body.get("subscription_error", False))
    state.hostile = Hostility.from_profile(body)


def _grant(state: FhirState, header: str) -> object:
    """What the Authorization header proves (falsy: nothing): the authorizer's grant, or True."""
    if state.authorizer is not None:
        return state.authorizer(header)
    if state.token is not None:
        return secrets.compare_digest(header, f"Bearer {state.token}")
    if state.basic is not None:
        expected = base64.b64encode(f"{state.basic[0]}:{state.basic[1]}".encode()).decode()
        return secrets.compare_digest(header, f"Basic {expected}")
    return True


def history_params(params: Any) -> tuple[Pairs, datetime | None, int]:
    """The parameters a history request honours (for its self link), its `_since` and its `_count`;
    QueryError when one is unreadable."""
    used: Pairs = []
    since = parse_instant(params.get("_since"))
    if "_since" in params:
        if since is None:
            raise QueryError("_since must be an instant such as 2026-11-20T10:00:00Z")
        used.append(("_since", params["_since"]))
    try:
        count = max(1, min(int(params.get("_count", "20")), 500))
    except ValueError:
        raise QueryError("_count must be a number") from None
    used.append(("_count", str(count)))
    return used, since, count


def create_app(state: FhirState) -> Starlette:
    async def guard(request: Request, interaction: str | None, resource_type: str | None = None) -> Response | None:
        state.requests.append(f"{request.method} {request.url.path}?{request.url.query}")
        state.base_url = str(request.base_url).rstrip("/")
        state.subscriptions.outbox.attach()
        if state.latency:
            await asyncio.sleep(state.latency)
        grant = _grant(state, request.headers.get("authorization", ""))
        if not grant:
            return outcome(401, "login", "authentication required")
        if state.enforce_scopes and interaction is not None:
            scope = getattr(grant, "scope", None)
            if not isinstance(scope, str) or not grants(scope, resource_type, interaction):
                return outcome(
                    403, "forbidden", f"the access token lacks the scope {needed(resource_type, interaction)}"
                )
        if status := state.injected_status(read=request.method == "GET"):
            return injected(status)
        return None

    def no_subscriptions() -> Response:
        return outcome(404, "not-supported", f"Subscription is not supported by this server ({state.mode})")

    async def search(request: Request) -> Response:
        resource_type = request.path_params["type"]
        if (denied := await guard(request, "search", resource_type)) is not None:
            return denied
        if resource_type not in searchable(state.mode):
            return outcome(404, "not-supported", f"{resource_type} is not searchable here")
        pairs = request.query_params.multi_items()
        try:
            query = build_query(resource_type, pairs, state.mode, state.ignore, state.base_url)
        except QueryError as exc:
            return outcome(400, "invalid", str(exc))
        return page(state, str(request.url), search_snapshot(state, resource_type, query), 0)

    async def next_page(request: Request) -> Response:
        token = request.query_params.get("token", "")
        snapshot = state.snapshots.get(token)
        scope = (snapshot.interaction, snapshot.resource_type) if snapshot else (None, None)
        if (denied := await guard(request, *scope)) is not None:
            return denied
        try:
            offset = int(request.query_params.get("offset", "0"))
        except ValueError:
            return outcome(400, "invalid", "bad offset")
        return page(state, str(request.url), token, offset)

    async def history(request: Request) -> Response:
        resource_type: str | None = request.path_params.get("type")
        resource_id: str | None = request.path_params.get("id")
        interaction = "read" if resource_id else "search"
        if (denied := await guard(request, interaction, resource_type)) is not None:
            return denied
        if state.mode != "full":
            return outcome(404, "not-supported", f"history is not supported by this server ({state.mode})")
        if resource_type is not None and resource_type not in searchable(state.mode):
            return outcome(404, "not-supported", f"{resource_type} has no history here")
        params = request.query_params
        if "_page" in params:
            offset = params.get("_offset", "0")
            if not offset.isdigit():
                return outcome(400, "invalid", "bad _offset")
            return page(state, str(request.url), params["_page"], int(offset))
        try:
            used, since, count = history_params(params)
        except QueryError as exc:
            return outcome(400, "invalid", str(exc))
        changes = [
            c
            for c in list(state.history)
            if resource_type in (None, c.resource_type)
            and resource_id in (None, c.resource_id)
            and (since is None or c.when >= since)
        ]
        where = "".join(f"{part}/" for part in (resource_type, resource_id) if part)
        return page(state, str(request.url), history_snapshot(state, changes, used, count, where), 0)

    async def vread(request: Request) -> Response:
        rtype, rid, vid = (request.path_params[k] for k in ("type", "id", "vid"))
        if (denied := await guard(request, "read", rtype)) is not None:
            return denied
        if state.read_status:
            return outcome(state.read_status, "transient", "injected read failure")
        version = next((v for v in state.versions(rtype, rid) if v["meta"]["versionId"] == vid), None)
        if version is not None:
            headers = version_headers(version, state.base_url)
            return FhirJson(version, headers={k: v for k, v in headers.items() if k != "Location"})
        deleted = any(c.resource_id == rid and c.version_id == vid for c in state.history if c.resource_type == rtype)
        return outcome(410 if deleted else 404, "deleted" if deleted else "not-found", f"{rtype}/{rid}/_history/{vid}")

    async def instance(request: Request) -> Response:
        rtype, rid = request.path_params["type"], request.path_params["id"]
        if (denied := await guard(request, INSTANCE[request.method], rtype)) is not None:
            return denied
        if rtype == "Subscription" and state.mode != "full":
            return no_subscriptions()
        if request.method == "PUT":
            return await fhir_writes.update(request, state, rtype, rid)
        if request.method == "DELETE":
            return await fhir_writes.delete(request, state, rtype, rid)
        if state.read_status:
            return outcome(state.read_status, "transient", "injected read failure")
        resource = state.current(rtype, rid)
        if resource is None:
            gone = (rtype, rid) in state.deleted
            return outcome(410 if gone else 404, "deleted" if gone else "not-found", f"{rtype}/{rid}")
        headers = version_headers(resource, state.base_url)
        return FhirJson(resource, headers={k: v for k, v in headers.items() if k != "Location"})

    async def create(request: Request) -> Response:
        rtype = request.path_params["type"]
        if (denied := await guard(request, "create", rtype)) is not None:
            return denied
        if rtype == "Subscription" and state.mode != "full":
            return no_subscriptions()
        return await fhir_writes.create(request, state, rtype)

    async def subscription_status(request: Request) -> Response:
        if (denied := await guard(request, "read", "Subscription")) is not None:
            return denied
        if state.mode != "full":
            return no_subscriptions()
        wanted = request.path_params.get("id")
        ids = [wanted] if wanted else [rid for (rtype, rid) in state.resources if rtype == "Subscription"]
        bundle = state.subscriptions.status_bundle(state, ids)
        if wanted and not bundle["entry"]:
            return outcome(404, "not-found", f"Subscription/{wanted}")
        return JSONResponse(bundle, media_type=FHIR_JSON)

    async def metadata(request: Request) -> Response:
        return JSONResponse(capability(state.mode, state.conditional_create), media_type=FHIR_JSON)

    async def faults(request: Request) -> Response:
        try:
            apply_profile(state, json.loads(await request.body() or b"{}"))
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
            Route("/{type}/{id}/_history", history, methods=["GET"]),
            Route("/{type}/{id}/_history/{vid}", vread, methods=["GET"]),
        ]
    )
