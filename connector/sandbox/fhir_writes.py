"""Writes over HTTP as an R4 server answers them: create, conditional create, version-aware update, delete.

- `POST [type]` stores the body under a new id: 201 with `Location: [base]/[type]/[id]/_history/[vid]`,
  `ETag: W/"vid"` and `Last-Modified`. With `If-None-Exist: identifier=system|value` (any search the type
  supports; an unknown parameter is a 400, never ignored): no match creates (201), one match answers it
  (200) and stores nothing, several answer 412. The search and the write happen under the store's lock.
- `PUT [type]/[id]` stores a new version (201 when it created the resource); with `If-Match: W/"vid"` only
  if that is the current version, else 412. `DELETE` takes `If-Match` too and answers 204.
- `Prefer: return=minimal | representation | OperationOutcome` (default representation) shapes the body.
- Bodies are validated with the fhir.resources R4B models (R4B reads these R4 resources) and the required
  code bindings of the statuses the connector writes: an unknown element, a missing required one or a
  wrong code is a 422 OperationOutcome naming the element paths (never the values, which may be PHI).
- `FhirState.write_faults` fail the next write requests: before the write (nothing stored) or after it (the
  answer is lost, the write is not), with a status and/or a hang that outlasts a client's timeout.
Every write request is recorded in `FhirState.writes` with the status it was answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Callable
from functools import cache
from typing import Any
from urllib.parse import parse_qsl

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from connector.fhir import FHIR_ID
from connector.sandbox.fhir_responses import FHIR_JSON, FhirJson, injected, outcome, version_headers
from connector.sandbox.fhir_search import Query, QueryError, condition
from connector.sandbox.fhir_store import FhirState, PreconditionFailed, WriteFault, WriteRecord
from connector.sandbox.fhir_subscriptions import SubscriptionError

Resource = dict[str, Any]
ETAG = re.compile(r'(?:W/)?"([^"]+)"')


def _codes(text: str) -> frozenset[str]:
    return frozenset(text.split())


CODES: dict[tuple[str, str], frozenset[str]] = {  # required bindings of the elements the connector writes
    ("Appointment", "status"): _codes(
        "proposed pending booked arrived fulfilled cancelled noshow entered-in-error checked-in waitlist"
    ),
    ("AppointmentResponse", "participantStatus"): _codes("accepted declined tentative needs-action"),
    ("Communication", "status"): _codes(
        "preparation in-progress not-done on-hold stopped completed entered-in-error unknown"
    ),
    ("Task", "status"): _codes(
        "draft requested received accepted rejected ready cancelled in-progress on-hold failed completed "
        "entered-in-error"
    ),
    ("Task", "intent"): _codes(
        "unknown proposal plan order original-order reflex-order filler-order instance-order option"
    ),
}


class Refused(Exception):
    """A write the server refuses before touching the store, with its answer."""

    def __init__(self, status: int, code: str, text: str) -> None:
        super().__init__(text)
        self.status, self.code, self.text = status, code, text


@cache
def _model(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(resource_type)
    except (ValueError, KeyError):
        return None


def problems(resource: Resource) -> list[str]:
    """The element paths that make `resource` invalid FHIR (empty when it is valid)."""
    try:
        _model(resource["resourceType"]).model_validate(resource)
    except ValidationError as exc:
        return sorted({".".join(str(p) for p in e["loc"]) or "(resource)" for e in exc.errors()})
    return [
        f"{element} (not one of the codes of its required binding)"
        for (resource_type, element), codes in CODES.items()
        if resource_type == resource["resourceType"] and resource.get(element) not in codes
    ]


async def body_of(request: Request, resource_type: str) -> Resource:
    """The request's resource (of the URL's type, not yet validated), or Refused."""
    if _model(resource_type) is None:
        raise Refused(404, "not-supported", f"{resource_type} is not a FHIR R4 resource type")
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise Refused(400, "invalid", "body is not JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "invalid", "body is not a FHIR resource")
    if body.setdefault("resourceType", resource_type) != resource_type:
        raise Refused(400, "invalid", f"body is a {body['resourceType']}, not a {resource_type} as the URL says")
    return body


def checked(resource: Resource) -> Resource:
    found = problems(resource)
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise Refused(422, "processing", f"{resource['resourceType']} is not valid FHIR R4: check {shown}")
    return resource


def if_match(request: Request) -> str | None:
    """The versionId an `If-Match` header names (`W/"3"`, `"3"` or `*`), or None without the header."""
    header = request.headers.get("if-match")
    if header is None:
        return None
    if header.strip() == "*":
        return "*"
    matched = ETAG.fullmatch(header.strip())
    if matched is None:
        raise Refused(400, "invalid", 'If-Match must be a version ETag such as W/"3"')
    return matched[1]


def if_none_exist(request: Request, state: FhirState, resource_type: str) -> Query | None:
    header = request.headers.get("if-none-exist")
    if header is None or not state.conditional_create:
        return None
    text = header.strip().removeprefix(f"{resource_type}?").removeprefix("?")
    try:
        return condition(resource_type, parse_qsl(text, keep_blank_values=True), state.base_url)
    except QueryError as exc:
        raise Refused(400, "invalid", str(exc)) from None


def answer(request: Request, resource: Resource, status: int, base: str) -> Response:
    """The answer to a successful write, shaped by `Prefer: return=…`."""
    headers = version_headers(resource, base)
    prefer = {p.strip() for p in re.split(r"[,;]", request.headers.get("prefer", ""))}
    if "return=minimal" in prefer:
        return Response(status_code=status, headers=headers)
    if "return=OperationOutcome" in prefer:
        note = {"severity": "information", "code": "informational", "diagnostics": f"{status}"}
        return JSONResponse(
            {"resourceType": "OperationOutcome", "issue": [note]}, status, headers=headers, media_type=FHIR_JSON
        )
    return FhirJson(resource, status_code=status, headers=headers)


async def hold(request: Request, seconds: float) -> None:
    """Hold the answer for `seconds`, or until the client has gone away."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (remaining := deadline - loop.time()) > 0 and not await request.is_disconnected():
        await asyncio.sleep(min(0.05, remaining))


async def create(request: Request, state: FhirState, resource_type: str) -> Response:
    record = WriteRecord("create", resource_type, None, 0, if_none_exist=request.headers.get("if-none-exist"))
    try:
        body = checked(await body_of(request, resource_type))
        query = if_none_exist(request, state, resource_type)
    except Refused as refused:
        return _refused(state, record, refused)
    return await _commit(request, state, record, lambda: state.create(body, query))


async def update(request: Request, state: FhirState, resource_type: str, resource_id: str) -> Response:
    record = WriteRecord("update", resource_type, None, 0, if_match=request.headers.get("if-match"))
    try:
        if not FHIR_ID.fullmatch(resource_id):
            raise Refused(400, "invalid", "the id in the URL is not a FHIR id ([A-Za-z0-9-.]{1,64})")
        body = await body_of(request, resource_type)
        if body.setdefault("id", resource_id) != resource_id:
            raise Refused(400, "invalid", f"the body's id is not {resource_id} as the URL says")
        checked(body)
        version = if_match(request)
    except Refused as refused:
        return _refused(state, record, refused)
    return await _commit(request, state, record, lambda: state.update(body, version))


async def delete(request: Request, state: FhirState, resource_type: str, resource_id: str) -> Response:
    record = WriteRecord("delete", resource_type, resource_id, 0, if_match=request.headers.get("if-match"))
    try:
        version = if_match(request)
    except Refused as refused:
        return _refused(state, record, refused)
    fault = state.next_write_fault()
    if (early := await _before(request, state, record, fault)) is not None:
        return early
    try:
        state.remove(resource_type, resource_id, version)
    except PreconditionFailed as exc:
        return _refused(state, record, Refused(412, "conflict", str(exc)))
    return await _after(request, state, record, fault, Response(status_code=204))


async def _commit(
    request: Request, state: FhirState, record: WriteRecord, write: Callable[[], tuple[Resource, bool]]
) -> Response:
    """Run `write` (returning the stored version and whether it was created) amid the next write fault."""
    fault = state.next_write_fault()
    if (early := await _before(request, state, record, fault)) is not None:
        return early
    try:
        stored, created = write()
    except PreconditionFailed as exc:
        return _refused(state, record, Refused(412, "conflict", str(exc)))
    except SubscriptionError as exc:
        return _refused(state, record, Refused(400, "invalid", str(exc)))
    status = 201 if created else 200
    record = _with(record, resource_id=stored["id"], version_id=stored["meta"]["versionId"])
    return await _after(request, state, record, fault, answer(request, stored, status, state.base_url))


async def _before(request: Request, state: FhirState, record: WriteRecord, fault: WriteFault) -> Response | None:
    """A fault that strikes before the write: hold, then fail (nothing stored) or go on."""
    if fault.after_commit:
        return None
    if fault.hang:
        await hold(request, fault.hang)
    if fault.status:
        state.writes.append(_with(record, resource_id=None, status=fault.status))
        return injected(fault.status)
    return None


async def _after(
    request: Request, state: FhirState, record: WriteRecord, fault: WriteFault, response: Response
) -> Response:
    """The write is stored: a fault after it holds the answer and/or replaces it with a failure."""
    if fault.after_commit and fault.hang:
        await hold(request, fault.hang)
    if fault.after_commit and fault.status:
        response = injected(fault.status)
    state.writes.append(_with(record, status=response.status_code))
    return response


def _refused(state: FhirState, record: WriteRecord, refused: Refused) -> Response:
    state.writes.append(_with(record, status=refused.status))
    return outcome(refused.status, refused.code, refused.text)


def _with(record: WriteRecord, **changes: Any) -> WriteRecord:
    return dataclasses.replace(record, **changes)
