"""Pure: what new versions of appointments mean for the ledger.

Each version is compared with the remembered state (connector.lifecycle: snapshot → transitions) and its
transitions are planned with the mappings (connector.mapping.engine). The result, a `Decision`, is what one
transaction records: new notifications, withdrawals, the new states, and the versions quarantined while
deciding (one version that cannot be decided, or whose notifications could not be stored, is set aside
alone: connector.intake.checks). A deletion is decided the same way, from the remembered state to nothing.

Nothing here reads or writes: the remembered states, who was told, the mappings and the clock come in as
values, and the mappings that failed come back as values for the caller to log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from connector import fhir
from connector.intake.checks import Examined, Seen, check_storable, reason, seen_key
from connector.ledger import SeenVersion, Withdrawal
from connector.lifecycle import Snapshot, Transition, appointment_zone, is_stale, snapshot, synthesized, transitions
from connector.mapping.engine import Situation, plan

if TYPE_CHECKING:
    from connector.config.sources import FhirPollSourceConfig
    from connector.mapping.loader import MappingSet
    from connector.models import Clock, PlannedNotification, PlanNote
    from connector.timing import QuietHours

Triple = tuple[str, str, str]  # (resource type, id, version)


@dataclass
class Decision:
    """What a page (or a deletion) means for the ledger; committed in one transaction."""

    notifications: list[PlannedNotification] = field(default_factory=list)
    withdrawals: list[Withdrawal] = field(default_factory=list)
    snapshots: dict[str, Snapshot | None] = field(default_factory=dict)
    notes: list[tuple[str, PlanNote]] = field(default_factory=list)  # (appointment id, note)
    quarantined: list[SeenVersion] = field(default_factory=list)  # versions that could not be decided
    failed: list[tuple[str, PlanNote]] = field(default_factory=list)  # (resource, mapping that failed): to log

    def merge(self, other: Decision) -> None:
        self.notifications += other.notifications
        self.withdrawals += other.withdrawals
        self.snapshots.update(other.snapshots)
        self.notes += other.notes
        self.quarantined += other.quarantined
        self.failed += other.failed


@dataclass(frozen=True)
class Rules:
    """What deciding for one source depends on, besides the versions, the states and who was told."""

    source: str
    settings: FhirPollSourceConfig
    mappings: MappingSet
    quiet: QuietHours | None
    clock: Clock
    reschedule_on: frozenset[str] = frozenset({"start"})  # config `reschedule_on`

    def situation(self, appointment: dict[str, Any], version: str, notified: set[tuple[str, str]]) -> Situation:
        zone = appointment_zone(appointment, self.settings.location_timezones, self.settings.timezone)
        appointment_id = str(appointment.get("id"))
        told = frozenset(p for a, p in notified if a == appointment_id)
        return Situation(
            self.source,
            appointment,
            version,
            zone,
            self.quiet,
            told,
            self.clock(),
            reschedule_on=self.reschedule_on,
        )


def triple(seen: SeenVersion) -> Triple:
    return seen.resource_type, seen.resource_id, seen.version


def recorded(examined: Examined, decision: Decision) -> list[SeenVersion]:
    """The seen versions to record: those examined, with the reason for each one quarantined while deciding."""
    bad = {triple(q): q for q in decision.quarantined}
    return [bad.get(triple(s), s) for s in examined.seen]


def apply(
    rules: Rules,
    decision: Decision,
    appointment: dict[str, Any],
    version: str,
    changes: list[Transition],
    notified: set[tuple[str, str]],
) -> None:
    """Plan `changes` of one appointment into `decision`: withdrawals, notifications, notes."""
    apply_changes(decision, rules.mappings, rules.situation(appointment, version, notified), changes)


def apply_changes(decision: Decision, mappings: MappingSet, situation: Situation, changes: list[Transition]) -> None:
    """Plan the changes of the appointment `situation` describes (FHIR's or a CRM's) into `decision`."""
    appointment = situation.appointment
    appointment_id = str(appointment.get("id"))
    for change in changes:
        if change.withdraw:
            decision.withdrawals.append(
                Withdrawal(appointment_id, change.patients, f"withdrawn: the appointment became {change.event}")
            )
        result = plan(mappings, change, situation)
        decision.notifications += result.notifications
        for note in result.notes:
            decision.notes.append((appointment_id, note))
            if note.problem:
                decision.failed.append((fhir.describe(appointment), note))


def decide(rules: Rules, valid: list[Seen], before: dict[str, Snapshot], notified: set[tuple[str, str]]) -> Decision:
    """Diff each version against the remembered state and plan the changes. A version that cannot be
    decided, or whose result the ledger could not store, is quarantined alone (the mappings that failed
    while planning it are still reported in `failed`)."""
    decision = Decision()
    states = dict(before)
    for item in valid:
        appointment_id = str(item.resource["id"])
        part = Decision()
        try:
            after = snapshot(item.resource, item.version, item.last_updated, rules.settings.base_url)
            if is_stale(states.get(appointment_id), after):
                continue
            changes = transitions(states.get(appointment_id), after)
            apply(rules, part, item.resource, item.version, changes, notified)
            check_storable(part.notifications, after.patients)
        except Exception as exc:  # noqa: BLE001 - one version is quarantined, whatever went wrong
            decision.failed += part.failed
            decision.quarantined.append(
                SeenVersion(*seen_key(item.resource), item.last_updated, reason(exc, "planning"))
            )
            continue
        states[appointment_id] = after
        part.snapshots[appointment_id] = after
        decision.merge(part)
    return decision


def deletion(rules: Rules, appointment_id: str, before: Snapshot, notified: set[tuple[str, str]]) -> Decision:
    """What the source's deletion of a remembered appointment means: its pending notifications withdrawn
    and what the mappings plan for it (a cancellation, if the patient was told). The version names the
    deletion, so no cached copy of the last version passes for the current one. The caller checks that the
    notifications can be stored (`check_storable`) once it has reported the mappings that failed."""
    version = deleted_version(before)
    decision = Decision(snapshots={appointment_id: None})
    apply(rules, decision, synthesized(appointment_id, before), version, transitions(before, None), notified)
    return decision


def crm_appointment(
    mappings: MappingSet, situation: Situation, after: Snapshot, before: Snapshot | None
) -> Decision | None:
    """What a CRM event's account of an appointment (`situation`, `after`: connector.crm.appointments) means,
    decided by the same core as a FHIR version. None: the event is older (its `occurred_at`) than the state
    remembered, and changes nothing."""
    if is_stale(before, after):
        return None
    decision = Decision(snapshots={str(situation.appointment.get("id")): after})
    apply_changes(decision, mappings, situation, transitions(before, after))
    return decision


def deleted_version(before: Snapshot) -> str:
    return f"deleted-after-{before.version}"[:128]


def newest_per_id(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The newest history entry of each appointment. History lists newest first, so the first entry of an
    id stands unless a later one is provably newer (a DELETE entry may carry no time at all)."""
    latest: dict[str, dict[str, Any]] = {}
    for raw in entries:
        known = latest.get(str(raw.get("id")))
        if known is None:
            latest[str(raw.get("id"))] = raw
            continue
        known_time, updated = fhir.last_updated(known), fhir.last_updated(raw)
        if updated is not None and known_time is not None and updated > known_time:
            latest[str(raw.get("id"))] = raw
    return latest
