"""FHIR Subscription notifications, received:

    POST /fhir/<source>/notify                     R4 rest-hook ping (empty body) → an incremental poll now
                                                   (pings during a poll: one more poll after it);
                                                   a Backport notification Bundle → handshake, heartbeat, or
                                                   events (id-only: read each focus; full-resource: use it)
    PUT  /fhir/<source>/notify/Appointment/<id>    R4 rest-hook with payload → processed directly

The caller proves itself with the configured header (`channel.header` on the Subscription), compared in
constant time. What a notification sets off (a resync, reads, deletions) is decided by the hub
(connector.intake.subscriptions); the resources go through the planner. Answers are OperationOutcomes;
bodies are PHI: never logged.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeout
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from connector import fhir, metrics
from connector.errors import ResourceError
from connector.intake.notifications import parse_bundle
from connector.logs import where
from connector.web.common import RequestTooLarge, loads, read_body

if TYPE_CHECKING:
    from connector.config import Config
    from connector.intake.subscriptions import SubscriptionHub

log = structlog.get_logger("connector.subscriptions")


def outcome(status: int, code: str, text: str | list[str], reason: str) -> JSONResponse:
    """An OperationOutcome answer (one issue per text), counted and logged by reason (never the body)."""
    metrics.refused("fhir-subscription", reason)
    log.warning("request.rejected", endpoint="fhir-subscription", status=status, reason=reason)
    texts = [t.encode("utf-8", "replace").decode() for t in ([text] if isinstance(text, str) else text)]
    return JSONResponse(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": t} for t in texts],
        },
        status_code=status,
        media_type="application/fhir+json",
    )


class FhirEndpoints:
    def __init__(self, config: Config, hub: SubscriptionHub) -> None:
        self.config = config
        self.hub = hub

    def routes(self) -> list[Route]:
        return [
            Route("/fhir/{source}/notify", self.notify, methods=["POST"]),
            Route("/fhir/{source}/notify/Appointment/{id}", self.put_appointment, methods=["PUT"]),
        ]

    async def _admit(self, request: Request) -> tuple[str, bytes] | Response:
        name = request.path_params["source"]
        settings = self.config.sources.get(name)
        if settings is None or not settings.subscription.enabled or settings.subscription.secret is None:
            return outcome(404, "not-found", "no subscription endpoint here", "unknown source")
        given = request.headers.get(settings.subscription.header, "")
        expected = settings.subscription.secret.get_secret_value()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return outcome(401, "security", "the subscription header is missing or wrong", "bad secret")
        limit = self.config.server.max_body if self.config.server else 1_000_000
        try:
            return name, await read_body(request, limit)
        except RequestTooLarge:
            return outcome(413, "too-costly", "the notification is too large", "body too large")

    async def notify(self, request: Request) -> Response:
        admitted = await self._admit(request)
        if isinstance(admitted, Response):
            return admitted
        name, body = admitted
        if not body.strip():
            self.hub.pinged(name)
            return Response(status_code=200)
        try:
            document = loads(body)
        except ValueError as exc:  # jsontext.BadJson: a fixed reason
            return outcome(400, "structure", str(exc), "not JSON")
        kind = document.get("resourceType") if isinstance(document, dict) else None
        if kind == "Appointment":
            return await self._take(name, [document])
        if kind != "Bundle":
            return outcome(400, "structure", "expected a Bundle (or an Appointment)", "wrong resourceType")
        try:
            notification = parse_bundle(document, self.config.sources[name].base_url)
        except ResourceError as exc:
            return outcome(400, "structure", str(exc), "not a notification")
        resources = await self.hub.notified(name, notification)
        if resources is None:
            return Response(status_code=200)
        return await self._take(name, resources)

    async def put_appointment(self, request: Request) -> Response:
        admitted = await self._admit(request)
        if isinstance(admitted, Response):
            return admitted
        name, body = admitted
        try:
            resource = loads(body)
        except ValueError as exc:  # jsontext.BadJson: a fixed reason
            return outcome(400, "structure", str(exc), "not JSON")
        if (
            not isinstance(resource, dict)
            or resource.get("resourceType") != "Appointment"
            or str(resource.get("id")) != request.path_params["id"]
        ):
            return outcome(400, "structure", "expected the Appointment named in the URL", "wrong resource")
        return await self._take(name, [resource])

    async def _take(self, name: str, resources: list[dict[str, Any]]) -> Response:
        """Process the resources one version at a time. Any that cannot be processed is quarantined (see
        connector.intake.checks) and named in a 422 answer; the others are processed all the same."""
        try:
            committed = await self.hub.planner.ingest(name, resources)
        except (OperationalError, InterfaceError, SQLAlchemyTimeout, OSError) as exc:
            log.error("subscription.not_recorded", source=name, problem=where(exc))
            return outcome(
                503, "transient", "the notification could not be recorded now; send it again", "ledger unavailable"
            )  # the EHR retries: nothing is lost
        except Exception as exc:  # noqa: BLE001 - data that cannot be planned is the sender's, not a 500
            log.error(
                "subscription.unprocessable",
                source=name,
                resources=[fhir.describe(r) for r in resources][:5],
                problem=where(exc),
            )
            return outcome(
                422, "processing", "a resource in the notification could not be processed", "unprocessable resource"
            )
        if committed.quarantined:
            return outcome(
                422,
                "processing",
                [
                    f"{q.resource_type}/{q.resource_id} v{q.version} not processed: {q.problem}"
                    for q in committed.quarantined
                ],
                "resource quarantined",
            )
        return Response(status_code=200)
