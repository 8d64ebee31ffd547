"""The FHIR test server's answers that need no state: FHIR JSON, OperationOutcomes, injected failures, and the
version headers of a stored resource."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from starlette.responses import JSONResponse

FHIR_JSON = "application/fhir+json"
Resource = dict[str, Any]


class FhirJson(JSONResponse):
    """JSON as many servers write it, every non-ASCII character escaped (`\\u00e9`): a lone surrogate that a
    test planted in a resource goes out as the escape `\\ud800`, which a client's parser reads back as it."""

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def outcome(status: int, code: str, text: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]},
        status_code=status,
        media_type=FHIR_JSON,
        headers=headers,
    )


def injected(status: int) -> JSONResponse:
    code = {429: "throttled", 500: "exception"}.get(status, "transient")
    retry = {"Retry-After": "1"} if status in (429, 503) else None
    return outcome(status, code, "injected failure", retry)


def version_headers(resource: Resource, base: str) -> dict[str, str]:
    """ETag, Last-Modified and Location (`[base]/[type]/[id]/_history/[vid]`) of a stored version."""
    meta = resource["meta"]
    modified = datetime.fromisoformat(meta["lastUpdated"].replace("Z", "+00:00"))
    return {
        "ETag": f'W/"{meta["versionId"]}"',
        "Last-Modified": format_datetime(modified.astimezone(UTC), usegmt=True),
        "Location": f"{base}/{resource['resourceType']}/{resource['id']}/_history/{meta['versionId']}",
    }
