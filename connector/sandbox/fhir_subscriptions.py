"""Subscriptions for the FHIR test server: R4 classic rest-hook and the Subscriptions R5 Backport.

Classic (`criteria` is a search such as `Appointment?status=booked`; stored as `active`): each create or
update whose new version matches POSTs an empty body to `channel.endpoint` with the `channel.header`
headers, or, when `channel.payload` is set, PUTs the resource to `{endpoint}/{type}/{id}`. A delete
notifies nobody, as R4 says.

Backport (`meta.profile` has `backport-subscription`; `criteria` is a topic URL; filters are
`backport-filter-criteria` search strings, ANDed, Appointment when none): stored as `requested`, then a
`handshake` makes it `active` (2xx) or `error`. Each matching Appointment change or delete increments the
subscription's event counter and POSTs an `event-notification` Bundle (payload `empty`, `id-only` or
`full-resource`; `empty` when not given). Heartbeats are sent on demand (`POST /_test/heartbeat`), not by
a timer. `GET Subscription/{id}/$status` answers a searchset Bundle holding a `query-status` Parameters,
as the IG's OperationDefinition says.

The state is seen through the `ServerState` protocol below (the store imports this module, never the
reverse). `FhirState.put`/`delete` are synchronous and may run on any thread: they count events at once and
queue the deliveries; the server's event loop sends them (`fhir_outbox`, adopted on each request), one
subscription's in order, each once with a short timeout. Failures land in
`FhirState.notification_failures`; nothing is retried. Tests POST `/_test/flush` before their event loop
ends, or in-flight deliveries are cancelled with it.
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from connector.sandbox.fhir_outbox import Delivery, Outbox, Outgoing

Resource = dict[str, Any]
FHIR_JSON = "application/fhir+json"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
BACKPORT_PROFILE = BACKPORT + "backport-subscription"
STATUS_PROFILE = BACKPORT + "backport-subscription-status-r4"
CONTENTS = ("empty", "id-only", "full-resource")


class ServerState(Protocol):
    """What subscriptions need of the server's state (`fhir_store.FhirState`), declared here so that this
    module does not import the store that holds it."""

    base_url: str
    subscription_error: bool
    drop_notifications: int
    notification_failures: list[dict[str, Any]]

    def current(self, resource_type: str, resource_id: str) -> Resource | None: ...

    def store(self, resource: Resource, when: datetime | None = None, method: str = "PUT") -> Resource: ...

    def criteria_matches(self, criteria: str, resource: Resource) -> bool: ...

    def check_criteria(self, criteria: str) -> None: ...


class SubscriptionError(ValueError):
    """A Subscription the server refuses (400); the text names the element to fix."""


@dataclass(frozen=True)
class Channel:
    """What the server needs from a stored Subscription to notify."""

    backport: bool
    criteria: str  # classic: a search string; backport: the topic URL
    filters: tuple[str, ...]  # search strings a resource must all match
    endpoint: str
    headers: tuple[tuple[str, str], ...]
    payload: str | None  # classic: MIME type, or None for an empty ping
    content: str = "empty"  # backport: empty | id-only | full-resource


@dataclass(frozen=True)
class Event:
    """One counted change: number, time, method (POST/PUT/DELETE) and the version (the last one on DELETE)."""

    number: int
    timestamp: str
    method: str
    resource: Resource


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _extension(element: Any, name: str) -> list[Any]:
    """The values of the Backport extension `name` on `element`."""
    extensions = element.get("extension") if isinstance(element, dict) else None
    values: list[Any] = []
    for extension in extensions if isinstance(extensions, list) else []:
        if isinstance(extension, dict) and extension.get("url") == BACKPORT + name:
            values.append(next((v for k, v in extension.items() if k.startswith("value")), None))
    return values


def _header(value: Any) -> tuple[str, str]:
    name, colon, text = str(value).partition(":")
    if not colon or not name.strip():
        raise SubscriptionError("each channel.header must read 'Name: value'")
    return name.strip(), text.strip()


def channel_of(resource: Resource) -> Channel:
    """Read a Subscription's channel, or raise SubscriptionError naming what is missing."""
    channel = resource.get("channel")
    if not isinstance(channel, dict) or channel.get("type") != "rest-hook":
        raise SubscriptionError("Subscription.channel.type must be rest-hook (the only channel served here)")
    endpoint, criteria = channel.get("endpoint"), resource.get("criteria")
    if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        raise SubscriptionError("Subscription.channel.endpoint must be an http(s) URL")
    if not isinstance(criteria, str) or not criteria:
        raise SubscriptionError("Subscription.criteria is required")
    headers = channel.get("header") or []
    parsed = tuple(_header(h) for h in (headers if isinstance(headers, list) else [headers]))
    payload = channel.get("payload") if isinstance(channel.get("payload"), str) else None
    profiles = (resource.get("meta") or {}).get("profile") or []
    if BACKPORT_PROFILE not in profiles:
        return Channel(False, criteria, (criteria,), endpoint, parsed, payload)
    filters = tuple(str(f) for f in _extension(resource.get("_criteria"), "backport-filter-criteria"))
    content = next(iter(_extension(channel.get("_payload"), "backport-payload-content")), None) or "empty"
    if content not in CONTENTS:
        raise SubscriptionError(f"backport-payload-content must be one of {', '.join(CONTENTS)}")
    return Channel(True, criteria, filters or ("Appointment",), endpoint, parsed, payload, content)


def status_parameters(
    base: str, subscription_id: str, channel: Channel, status: str, kind: str, events: int, event: Event | None = None
) -> Resource:
    """The Backport R4 status resource (a Parameters) for a notification or a $status answer."""
    parameters: list[Resource] = [
        {"name": "subscription", "valueReference": {"reference": f"{base}/Subscription/{subscription_id}"}}
    ]
    if channel.backport:
        parameters.append({"name": "topic", "valueCanonical": channel.criteria})
    parameters += [
        {"name": "status", "valueCode": status},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(events)},
    ]
    if event is not None:
        part: list[Resource] = [
            {"name": "event-number", "valueString": str(event.number)},
            {"name": "timestamp", "valueInstant": event.timestamp},
        ]
        if channel.content != "empty":
            focus = f"{base}/{event.resource['resourceType']}/{event.resource['id']}"
            part.append({"name": "focus", "valueReference": {"reference": focus}})
        parameters.append({"name": "notification-event", "part": part})
    return {"resourceType": "Parameters", "meta": {"profile": [STATUS_PROFILE]}, "parameter": parameters}


def notification_bundle(
    base: str, subscription_id: str, channel: Channel, status: Resource, event: Event | None = None
) -> Resource:
    """A Backport R4 notification: a history Bundle whose first entry is the status Parameters."""
    entries: list[Resource] = [
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": status,
            "request": {"method": "GET", "url": f"{base}/Subscription/{subscription_id}/$status"},
            "response": {"status": "200"},
        }
    ]
    if event is not None and channel.content != "empty":
        url = f"{event.resource['resourceType']}/{event.resource['id']}"
        entry: Resource = {"fullUrl": f"{base}/{url}", "request": {"method": event.method, "url": url}}
        if channel.content == "full-resource" and event.method != "DELETE":
            entry["resource"] = event.resource
        entries.append(entry)
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "history", "timestamp": _now(), "entry": entries}


@dataclass
class Subscriptions:
    """The server's side of subscriptions: channels by Subscription id, event counters, the outbox."""

    channels: dict[str, Channel] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    outbox: Outbox = field(default_factory=Outbox)

    def admit(self, state: ServerState, resource: Resource) -> Resource:
        """Check a submitted Subscription and give it the server's status: `off` stays off; otherwise
        classic → `active`, Backport → `requested` (the handshake decides)."""
        channel = channel_of(resource)
        for criteria in channel.filters:
            try:
                state.check_criteria(criteria)
            except ValueError as exc:
                raise SubscriptionError(f"criteria {criteria!r}: {exc}") from exc
        status = "off" if resource.get("status") == "off" else "requested" if channel.backport else "active"
        admitted = {**resource, "status": status}
        admitted.pop("error", None)
        return admitted

    def written(self, state: ServerState, stored: Resource, created: bool) -> None:
        """After a version is written: register a Subscription, or notify about any other change."""
        if stored["resourceType"] != "Subscription":
            self._notify(state, stored, "POST" if created else "PUT", stored["meta"]["lastUpdated"])
            return
        subscription_id = stored["id"]
        self.channels[subscription_id] = channel_of(stored)
        if created:
            self.events[subscription_id] = 0
        if stored["status"] == "requested":
            self.outbox.send(
                Delivery(
                    subscription_id,
                    functools.partial(self._signal, state, subscription_id, "handshake"),
                    functools.partial(self._handshake_done, state, subscription_id),
                )
            )

    def deleted(self, state: ServerState, last: Resource, timestamp: str) -> None:
        """After a delete: forget a Subscription, or notify Backport subscriptions about the deletion."""
        if last["resourceType"] == "Subscription":
            self.channels.pop(last["id"], None)
        else:
            self._notify(state, last, "DELETE", timestamp)

    def heartbeat(self, state: ServerState) -> list[str]:
        """Queue a heartbeat for every active Backport subscription; their ids."""
        ids = [
            sid
            for sid, channel in list(self.channels.items())
            if channel.backport and self._status(state, sid) == "active"
        ]
        for sid in ids:
            self.outbox.send(
                Delivery(
                    sid,
                    functools.partial(self._signal, state, sid, "heartbeat"),
                    functools.partial(self._delivered, state, sid, "heartbeat"),
                )
            )
        return ids

    def status_bundle(self, state: ServerState, ids: list[str]) -> Resource:
        """The $status answer: a searchset Bundle of `query-status` Parameters, one per known id."""
        entries = [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "search": {"mode": "match"},
                "resource": status_parameters(
                    state.base_url,
                    sid,
                    self.channels[sid],
                    self._reported(state, sid),
                    "query-status",
                    self.events.get(sid, 0),
                ),
            }
            for sid in ids
            if sid in self.channels and self._status(state, sid) is not None
        ]
        return {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "searchset",
            "total": len(entries),
            "entry": entries,
        }

    def clear(self) -> None:
        self.channels.clear()
        self.events.clear()
        self.outbox.clear()

    def _status(self, state: ServerState, subscription_id: str) -> str | None:
        current = state.current("Subscription", subscription_id)
        return None if current is None else str(current.get("status"))

    def _reported(self, state: ServerState, subscription_id: str) -> str:
        return "error" if state.subscription_error else self._status(state, subscription_id) or "off"

    def _notify(self, state: ServerState, resource: Resource, method: str, timestamp: str) -> None:
        for sid, channel in list(self.channels.items()):
            if self._status(state, sid) in (None, "off") or (method == "DELETE" and not channel.backport):
                continue
            if not all(state.criteria_matches(criteria, resource) for criteria in channel.filters):
                continue
            self.events[sid] = number = self.events.get(sid, 0) + 1
            if state.drop_notifications > 0:
                state.drop_notifications -= 1
                continue
            event = Event(number, timestamp, method, resource)
            self.outbox.send(
                Delivery(
                    sid,
                    functools.partial(self._event, state, sid, event),
                    functools.partial(self._delivered, state, sid, "event-notification"),
                )
            )

    def _event(self, state: ServerState, subscription_id: str, event: Event) -> Outgoing | None:
        channel = self.channels.get(subscription_id)
        if channel is None or self._status(state, subscription_id) != "active":
            return None
        headers = dict(channel.headers)
        if not channel.backport:
            if channel.payload is None:
                return Outgoing("POST", channel.endpoint, headers, b"")
            url = f"{channel.endpoint.rstrip('/')}/{event.resource['resourceType']}/{event.resource['id']}"
            return Outgoing(
                "PUT", url, {"Content-Type": channel.payload, **headers}, json.dumps(event.resource).encode()
            )
        status = status_parameters(
            state.base_url,
            subscription_id,
            channel,
            self._reported(state, subscription_id),
            "event-notification",
            event.number,
            event,
        )
        bundle = notification_bundle(state.base_url, subscription_id, channel, status, event)
        return Outgoing("POST", channel.endpoint, {"Content-Type": FHIR_JSON, **headers}, json.dumps(bundle).encode())

    def _signal(self, state: ServerState, subscription_id: str, kind: str) -> Outgoing | None:
        """A handshake or heartbeat: the status entry only, the event counter unchanged."""
        channel, status = self.channels.get(subscription_id), self._status(state, subscription_id)
        if channel is None or status != ("requested" if kind == "handshake" else "active"):
            return None
        reported = "error" if state.subscription_error and kind == "heartbeat" else status
        parameters = status_parameters(
            state.base_url, subscription_id, channel, reported, kind, self.events.get(subscription_id, 0)
        )
        bundle = notification_bundle(state.base_url, subscription_id, channel, parameters)
        return Outgoing(
            "POST", channel.endpoint, {"Content-Type": FHIR_JSON, **dict(channel.headers)}, json.dumps(bundle).encode()
        )

    def _delivered(
        self, state: ServerState, subscription_id: str, kind: str, outgoing: Outgoing, error: str | None
    ) -> None:
        if error is not None:
            state.notification_failures.append(
                {"subscription": subscription_id, "type": kind, "url": outgoing.url, "error": error, "at": _now()}
            )

    def _handshake_done(self, state: ServerState, subscription_id: str, outgoing: Outgoing, error: str | None) -> None:
        self._delivered(state, subscription_id, "handshake", outgoing, error)
        current = state.current("Subscription", subscription_id)
        if current is None or current.get("status") != "requested":
            return  # changed or deleted meanwhile: the client's word stands
        updated = {**current, "status": "active" if error is None else "error"}
        if error is not None:
            updated["error"] = f"handshake failed: {error}"
        state.store(updated)
