"""FHIR Subscriptions pushing to `connector run`, and keeping them alive.

    POST /fhir/<source>/notify                     R4 rest-hook ping (empty body) → an incremental poll now;
                                                   a Backport notification Bundle → handshake, heartbeat, or
                                                   events (id-only: read each focus; full-resource: use it)
    PUT  /fhir/<source>/notify/Appointment/<id>    R4 rest-hook with payload → processed directly

The caller proves itself with the configured header (`channel.header` on the Subscription), compared in
constant time. A gap in `events-since-subscription-start`, a missed heartbeat or a `$status` of `error`
triggers a resync: an incremental poll from the source's cursor (the last safe watermark), then the
Subscription is set back to `requested`. A notification and a poll seeing the same version are one event:
seen versions and notification keys make the second a no-op. Bodies are PHI: never logged.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

import structlog
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeout
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from connector import fhir, metrics
from connector.config import Config
from connector.config.sources import FhirPollSourceConfig
from connector.errors import ResourceError, SourceError
from connector.ledger.sql import SqlLedger
from connector.logs import where
from connector.models import Clock
from connector.pipeline import Planner
from connector.sources.fhir_poll import FhirPollSource
from connector.sources.notifications import gap, parse_bundle
from connector.web import BodyTooLarge, loads, read_body

log = structlog.get_logger("connector.subscriptions")

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"


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


class SubscriptionHub:
    def __init__(
        self, config: Config, planner: Planner, sources: dict[str, FhirPollSource], ledger: SqlLedger, clock: Clock
    ) -> None:
        self.config = config
        self.planner = planner
        self.sources = sources
        self.ledger = ledger
        self.clock = clock
        self._resyncs: dict[str, asyncio.Task[Any]] = {}

    def routes(self) -> list[Route]:
        return [
            Route("/fhir/{source}/notify", self.notify, methods=["POST"]),
            Route("/fhir/{source}/notify/Appointment/{id}", self.put_appointment, methods=["PUT"]),
        ]

    # -- receiving ------------------------------------------------------------------------------------

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
        except BodyTooLarge:
            return outcome(413, "too-costly", "the notification is too large", "body too large")

    async def notify(self, request: Request) -> Response:
        admitted = await self._admit(request)
        if isinstance(admitted, Response):
            return admitted
        name, body = admitted
        if not body.strip():
            self.resync(name, "rest-hook notification")
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
        known = await asyncio.to_thread(
            self.ledger.heard,
            name,
            _relative(notification.subscription)[:300],
            notification.events_since,
            notification.status,
            self.clock(),
        )
        log.info("subscription.notification", source=name, kind=notification.kind, events=notification.events_since)
        if gap(known, notification):
            log.warning("subscription.gap", source=name, known=known, now=notification.events_since)
            self.resync(name, "missed subscription events")
        if notification.kind != "event-notification":
            return Response(status_code=200)
        resources = list(notification.resources)
        missing = [i for i in notification.focus_ids if i not in {str(r.get("id")) for r in resources}]
        try:
            for appointment_id in missing:
                found = await self.sources[name].read("Appointment", appointment_id)
                if found is None:
                    await self.planner.deleted(name, appointment_id)
                else:
                    resources.append(found)
        except SourceError as exc:
            log.warning("subscription.read_failed", source=name, problem=str(exc))
            self.resync(name, "a notified appointment could not be read")
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
        connector.intake) and named in a 422 answer; the others are processed all the same."""
        try:
            committed = await self.planner.ingest(name, resources)
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

    def resync(self, name: str, reason: str) -> None:
        """An incremental poll of the source now (one at a time per source)."""
        running = self._resyncs.get(name)
        if running is not None and not running.done():
            return
        log.info("subscription.resync", source=name, reason=reason)
        self._resyncs[name] = asyncio.get_running_loop().create_task(self.planner.poll(name, sweep=True))

    # -- keeping subscriptions alive ------------------------------------------------------------------

    async def watchdog(self) -> None:
        """A subscription silent for two heartbeat periods, or whose $status says error: resync and
        reactivate it."""
        now = self.clock()
        for name, settings in self.config.sources.items():
            if not (settings.subscription.enabled and settings.subscription.kind == "backport"):
                continue
            for subscription, _events, _status, last_seen in await asyncio.to_thread(self.ledger.subscriptions, name):
                if now - last_seen <= 2 * settings.subscription.heartbeat:
                    continue
                status = await self._status(name, subscription)
                log.warning("subscription.silent", source=name, status=status or "unknown")
                self.resync(name, "no heartbeat")
                if status != "active":
                    await self.reactivate(name, subscription)
                await asyncio.to_thread(self.ledger.heard, name, subscription, None, status, now)

    async def _status(self, name: str, subscription: str) -> str | None:
        try:
            answer = await self.sources[name].get_json(
                f"{_relative(subscription)}/$status", None, "Subscription $status"
            )
            bundle = (
                answer
                if isinstance(answer, dict) and answer.get("resourceType") == "Bundle"
                else {"resourceType": "Bundle", "entry": [{"resource": answer}]}
            )
            return parse_bundle(bundle, self.config.sources[name].base_url).status
        except (SourceError, ResourceError):
            return None

    async def reactivate(self, name: str, subscription: str) -> None:
        source = self.sources[name]
        try:
            current = await source.read("Subscription", _relative(subscription).split("/")[-1])
            if current is not None:
                current["status"] = "requested"
                await source.post(_relative(subscription), current, "Subscription reactivation", method="PUT")
                log.info("subscription.reactivated", source=name)
        except SourceError as exc:
            log.error("subscription.reactivate_failed", source=name, problem=str(exc))

    async def subscribe(self, name: str) -> tuple[str, str]:
        """Create the configured Subscription, or check the one created before. Returns (reference, status)."""
        source = self.sources[name]
        known = await asyncio.to_thread(self.ledger.subscriptions, name)
        for subscription, _events, _status, _seen in known:
            current = await source.read("Subscription", _relative(subscription).split("/")[-1])
            if current is not None:
                if current.get("status") not in ("active", "requested"):
                    await self.reactivate(name, subscription)
                return subscription, str(current.get("status"))
        created = await source.post(
            "Subscription", subscription_resource(self.config.sources[name]), "Subscription creation"
        )
        reference = f"Subscription/{(created or {}).get('id')}"
        await asyncio.to_thread(self.ledger.heard, name, reference, 0, str((created or {}).get("status")), self.clock())
        return reference, str((created or {}).get("status"))


def _relative(reference: str) -> str:
    """'https://ehr/fhir/Subscription/1' → 'Subscription/1'."""
    parts = reference.rstrip("/").split("/")
    return "/".join(parts[-2:])


def subscription_resource(settings: FhirPollSourceConfig) -> dict[str, Any]:
    """The Subscription the config asks for (R4 classic, or the R5 Backport profile)."""
    sub = settings.subscription
    if sub.endpoint is None or sub.secret is None:
        raise SourceError("subscription.endpoint and subscription.secret are needed to create a Subscription")
    channel: dict[str, Any] = {
        "type": "rest-hook",
        "endpoint": sub.endpoint,
        "header": [f"{sub.header}: {sub.secret.get_secret_value()}"],
    }
    resource: dict[str, Any] = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Patient appointment emails (connector)",
    }
    if sub.kind == "rest-hook":
        if sub.payload == "full-resource":
            channel["payload"] = "application/fhir+json"
        return {**resource, "criteria": sub.criteria, "channel": channel}
    if sub.topic is None:
        raise SourceError("subscription.topic (the SubscriptionTopic URL) is needed for a backport Subscription")
    channel.update(
        payload="application/fhir+json",
        _payload={"extension": [{"url": BACKPORT + "backport-payload-content", "valueCode": sub.payload}]},
        extension=[
            {"url": BACKPORT + "backport-heartbeat-period", "valueUnsignedInt": int(sub.heartbeat.total_seconds())}
        ],
    )
    return {
        **resource,
        "meta": {"profile": [BACKPORT + "backport-subscription"]},
        "criteria": sub.topic,
        "_criteria": {"extension": [{"url": BACKPORT + "backport-filter-criteria", "valueString": sub.criteria}]},
        "channel": channel,
    }
