"""What FHIR Subscription notifications set off, and keeping the Subscriptions alive.

A notification (received by connector.web.fhir, parsed by connector.intake.notifications) is noted with
its event count. A gap in `events-since-subscription-start`, a missed heartbeat or a `$status` of `error`
triggers a resync: a sweep of the overlap, then the Subscription is set back to `requested`. An R4 rest-hook
ping (no payload) sets off a quick poll (from where the last one ended); pings that arrive during a poll
are served together by one more poll after it. A sweep, asked for or due, runs beside the quick polls (see
connector.intake.polling), so that pings never wait for one. An event notification names
appointments: those it does not carry are read (gone means deleted); the resources go through the planner.
A notification and a poll seeing the same version are one event: seen versions and notification keys make
the second a no-op.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog

from connector.errors import ResourceError, SourceError
from connector.intake.notifications import Notification, gap, parse_bundle
from connector.logs import where

if TYPE_CHECKING:
    from connector.config import Config
    from connector.config.sources import FhirPollSourceConfig
    from connector.intake.planner import Planner
    from connector.intake.polling import Poller
    from connector.ledger.abc import Intake
    from connector.models import Clock
    from connector.sources.fhir_poll import FhirPollSource

log = structlog.get_logger("connector.subscriptions")

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"


class SubscriptionHub:
    def __init__(
        self,
        config: Config,
        planner: Planner,
        poller: Poller,
        sources: dict[str, FhirPollSource],
        intake: Intake,
        clock: Clock,
    ) -> None:
        self.config = config
        self.planner = planner
        self.poller = poller
        self.sources = sources
        self.intake = intake
        self.clock = clock
        self._resyncs: dict[str, asyncio.Task[Any]] = {}
        self._wanted: dict[str, bool] = {}  # a poll is wanted after the running one: True for a sweep

    async def notified(self, name: str, notification: Notification) -> list[dict[str, Any]] | None:
        """Note a notification; resync on a gap. For an event notification, the resources to process: those
        it carries and those it names, read now (an appointment the source no longer has is planned as a
        deletion); None for the other kinds (handshake, heartbeat, ...)."""
        known = await self.intake.heard(
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
            return None
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
        return resources

    def resync(self, name: str, reason: str) -> None:
        """A sweep of the source now: the whole overlap read again (a gap, a silent subscription, a read
        that failed)."""
        log.info("subscription.resync", source=name, reason=reason)
        self._want(name, sweep=True)

    def pinged(self, name: str) -> None:
        """An R4 rest-hook ping (no payload): a quick poll from where the last one ended (and a sweep beside
        it when one is due anyway, see connector.intake.cursor). Pings that arrive while a poll runs are
        answered by one more poll after it: each change is read once, and many at a time."""
        log.debug("subscription.ping", source=name)
        self._want(name, sweep=False)

    def _want(self, name: str, sweep: bool) -> None:
        """One poll task per source. A request while it runs is noted (a sweep wins over a poll) and served
        by the same task as soon as the running poll ends, so that a change made after that poll read the
        source is never left for the next scheduled poll. The task's polls are quick: a sweep they ask for
        runs beside them (`Poller.settled` waits for it)."""
        self._wanted[name] = sweep or self._wanted.get(name, False)
        running = self._resyncs.get(name)
        if running is None or running.done():
            self._resyncs[name] = asyncio.get_running_loop().create_task(self._polls(name))

    async def _polls(self, name: str) -> None:
        while name in self._wanted:
            sweep = self._wanted.pop(name)
            try:
                await self.poller.poll(name, sweep=sweep, quick=True)
            except Exception as exc:  # noqa: BLE001 - a ledger outage: the scheduled poll reads it later
                log.error("subscription.poll_failed", source=name, problem=where(exc))

    async def settled(self, name: str) -> None:
        """Wait until the polls that notifications of `name` asked for, and the sweep beside them, are over."""
        while (task := self._resyncs.get(name)) is not None and not task.done():
            await asyncio.shield(task)
        await self.poller.settled(name)

    # -- keeping subscriptions alive ------------------------------------------------------------------

    async def watchdog(self) -> None:
        """A subscription silent for two heartbeat periods, or whose $status says error: resync and
        reactivate it."""
        now = self.clock()
        for name, settings in self.config.sources.items():
            if not (settings.subscription.enabled and settings.subscription.kind == "backport"):
                continue
            for subscription, _events, _status, last_seen in await self.intake.subscriptions(name):
                if now - last_seen <= 2 * settings.subscription.heartbeat:
                    continue
                status = await self._status(name, subscription)
                log.warning("subscription.silent", source=name, status=status or "unknown")
                self.resync(name, "no heartbeat")
                if status != "active":
                    await self.reactivate(name, subscription)
                await self.intake.heard(name, subscription, None, status, now)

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
        known = await self.intake.subscriptions(name)
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
        await self.intake.heard(name, reference, 0, str((created or {}).get("status")), self.clock())
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
