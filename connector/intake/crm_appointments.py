"""CRM events that describe appointments (`crm.<name>.appointment`), decided by the lifecycle core FHIR
Appointments use (connector.intake.decide.crm_appointment): each event is read as the appointment's new state
(connector.crm.appointments.describe) and compared with the state remembered for it, in the order the events
were received; an event older (its `occurred_at`) than the remembered state changes nothing and is recorded
as seen. With `fetch_object` the CRM object is read through the CRM's API first: when the CRM cannot be read,
the event waits in the inbox for the next pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import httpx
import structlog

from connector.crm.appointments import (
    Deleted,
    Described,
    appointment_id_of,
    describe,
    describes_appointment,
    object_gone,
)
from connector.errors import ResourceError, SourceError
from connector.intake.checks import check_storable
from connector.intake.decide import crm_appointment
from connector.ledger import SeenVersion, Withdrawal
from connector.lifecycle import BOOKED
from connector.logs import safe_text
from connector.mapping.engine import Situation
from connector.sources.hubspot import HubSpotClient

if TYPE_CHECKING:
    from connector.config import Config
    from connector.ledger.abc import Intake
    from connector.lifecycle import Snapshot
    from connector.mapping.loader import MappingSet
    from connector.models import Clock, PlannedNotification
    from connector.timing import QuietHours

log = structlog.get_logger("connector.crm")
FUTURE_SKEW = timedelta(hours=1)  # how far ahead of our clock an event's time may be (clocks differ)


@dataclass
class Told:
    """What one event's account of an appointment adds to the batch's transaction."""

    notifications: list[PlannedNotification] = field(default_factory=list)
    states: list[tuple[str, str, Snapshot | None]] = field(default_factory=list)  # (source, id, state; None: gone)
    withdrawals: list[tuple[str, Withdrawal]] = field(default_factory=list)
    seen: SeenVersion | None = None  # a stale event, recorded as seen


class CrmAppointments:
    def __init__(
        self,
        config: Config,
        mappings: MappingSet,
        intake: Intake,
        clock: Clock,
        quiet: QuietHours | None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.mappings = mappings
        self.intake = intake
        self.clock = clock
        self.quiet = quiet
        self.apis = {
            name: HubSpotClient(name, settings, transport)
            for name, settings in config.crm.items()
            if settings.appointment is not None and settings.appointment.fetch_object and settings.api_token
        }
        self.unreadable: set[str] = set()  # sources whose CRM could not be read in this pass
        self.states: dict[tuple[str, str], Snapshot] = {}
        self.told: set[tuple[str, str, str]] = set()

    def describes(self, source: str, event: dict[str, Any]) -> bool:
        """Does this event describe an appointment of its source? Raises ResourceError (its condition)."""
        settings = self.config.crm[source].appointment if source in self.config.crm else None
        return settings is not None and describes_appointment(settings, event)

    def declared(self, source: str) -> bool:
        """Does this source declare how its events describe appointments?"""
        return source in self.config.crm and self.config.crm[source].appointment is not None

    async def complete(
        self, source: str, event: dict[str, Any], objects: dict[tuple[str, str], Any] | None = None
    ) -> bool:
        """Read the CRM object into the event when the source asks for it; False: the CRM cannot be read now
        (the event waits). An object the CRM no longer has is left out (`object` is null). `objects` keeps
        what was read for the next events of the same object (a replay reads each object once). Once the
        CRM could not be read, the source's later events of the pass wait without asking it again (a CRM
        that times out would otherwise hold the inbox for as many timeouts as there are events)."""
        settings = self.config.crm[source].appointment
        api = self.apis.get(source)
        if settings is None or not settings.fetch_object or api is None:
            return True
        if source in self.unreadable:
            return False
        handle = (settings.object_type or str(event.get("event_type")), str(event.get("object_id")))
        if objects is not None and handle in objects:
            event["object"] = objects[handle]
            return True
        try:
            event["object"] = await api.read(
                str(event.get("event_type")), str(event.get("object_id")), settings.object_type
            )
        except SourceError as exc:
            log.warning("crm.object_unreadable", source=source, problem=str(exc), action="its events wait")
            self.unreadable.add(source)
            return False
        if objects is not None:
            objects[handle] = event["object"]
        return True

    def appointment_id(self, source: str, event: dict[str, Any]) -> str | None:
        """The appointment id the event names, when it can be read before its CRM object is fetched."""
        settings = self.config.crm[source].appointment
        assert settings is not None
        try:
            return appointment_id_of(settings, event)
        except ResourceError:
            return None

    def read(self, source: str, inbox_id: int, event: dict[str, Any]) -> Described | Deleted:
        """The appointment the event describes, or the one whose CRM object is gone. Raises ResourceError."""
        crm = self.config.crm[source]
        assert crm.appointment is not None
        if object_gone(crm.appointment, event):
            return Deleted(appointment_id_of(crm.appointment, event))
        return describe(crm.appointment, event, str(inbox_id), crm.timezone)

    async def recall(self, described: list[tuple[str, Described | Deleted]], first_sight: bool = False) -> None:
        """The remembered states of the batch's appointments (none at first sight: a replay), and who was
        told about them."""
        self.states.clear()
        self.told.clear()
        by_source: dict[str, list[str]] = {}
        for source, item in described:
            by_source.setdefault(source, []).append(item.appointment_id)
        for source, ids in by_source.items():
            remembered = {} if first_sight else await self.intake.snapshots(source, ids)
            for appointment_id, state in remembered.items():
                self.states[(source, appointment_id)] = state
            self.told |= {(source, a, p) for a, p in await self.intake.notified(source, ids)}

    def decide(self, source: str, inbox_id: int, event_id: str, described: Described | Deleted) -> Told:
        """What the event means, against the state the batch has reached so far (which it then moves on).
        Raises whatever is wrong with the event (the caller quarantines it)."""
        key = (source, described.appointment_id)
        if isinstance(described, Deleted):
            return self._deleted(source, inbox_id, described)
        told = frozenset(p for s, a, p in self.told if (s, a) == key)
        situation = Situation(
            source,
            described.view,
            str(inbox_id),
            described.zone,
            self.quiet,
            told,
            self.clock(),
            resource_type="CrmAppointment",
            reschedule_on=frozenset(self.config.reschedule_on),
        )
        before = self.states.get(key)
        after = self._timed(described.snapshot, before)
        decision = crm_appointment(self.mappings, situation, after, before)
        if decision is None:
            log.info("crm.stale", source=source, inbox=inbox_id, appointment=safe_text(described.appointment_id, 64))
            return Told(seen=SeenVersion("CrmEvent", str(inbox_id), safe_text(event_id, 128), after.last_updated, None))
        for _, note in decision.failed:
            log.error("mapping.failed", mapping=note.mapping, source=source, inbox=inbox_id, problem=note.message)
        check_storable(decision.notifications, after.patients)
        self.states[key] = after
        return Told(
            notifications=decision.notifications,
            states=[(source, described.appointment_id, after)],
            withdrawals=[(source, w) for w in decision.withdrawals],
        )

    def _timed(self, after: Snapshot, before: Snapshot | None) -> Snapshot:
        """The event's state with the time it is ordered by. An event from the future would make every later
        event look stale (a CRM's wrong clock, an `occurred_at` path that finds the appointment's start):
        refused. An event without a time (a generic source without `occurred_at`) keeps the time remembered,
        so that an older redelivery after it is still recognised as older."""
        occurred = after.last_updated
        if occurred is not None and occurred > self.clock() + FUTURE_SKEW:
            raise ResourceError(
                "the event's time (occurred_at) is more than an hour ahead of this server's clock: check the "
                "CRM's clock, or the `occurred_at` path of the source's appointment declaration"
            )
        if occurred is None and before is not None and before.last_updated is not None:
            return replace(after, last_updated=before.last_updated)
        return after

    def first_sight(self, source: str, told: Told) -> None:
        """A replay meets each appointment first as its oldest stored event shows it (earlier ones may be
        purged; a fetched object shows the appointment as it is now): a patient who was already told about
        the appointment is not sent a confirmation again, which would name the start as it is now, under
        another key than the one they had."""
        told.notifications[:] = [n for n in told.notifications if not self._confirms_again(source, n)]

    def _confirms_again(self, source: str, n: PlannedNotification) -> bool:
        mapping = self.mappings.get(n.mapping)
        return (
            n.event == BOOKED
            and mapping is not None
            and not mapping.spec.is_reminder
            and (source, n.resource_id, n.patient_id) in self.told
        )

    def _deleted(self, source: str, inbox_id: int, deleted: Deleted) -> Told:
        """The CRM no longer has the appointment's object: its pending notifications are withdrawn and its
        state forgotten. No email: the address was on the object."""
        before = self.states.pop((source, deleted.appointment_id), None)
        if before is None:
            return Told()
        log.info("crm.object_deleted", source=source, inbox=inbox_id, appointment=safe_text(deleted.appointment_id, 64))
        withdrawal = Withdrawal(deleted.appointment_id, before.patients, "withdrawn: the CRM object was deleted")
        return Told(states=[(source, deleted.appointment_id, None)], withdrawals=[(source, withdrawal)])

    async def aclose(self) -> None:
        for api in self.apis.values():
            await api.aclose()


def withdraw_planned(planned: list[PlannedNotification], withdrawals: list[tuple[str, Withdrawal]]) -> None:
    """Drop what an earlier event of the same batch planned and a later one withdraws (the ledger applies a
    batch's withdrawals before its notifications)."""
    for source, w in withdrawals:
        planned[:] = [
            n
            for n in planned
            if not (
                n.source == source
                and n.resource_type == "CrmAppointment"
                and n.resource_id == w.appointment_id
                and n.patient_id in w.patients
            )
        ]
