"""What each console page shows, gathered from the ledger in one blocking call (run on a worker thread by
connector.ledger.aio.AsyncConsole): the overview's facts, a page of search results, a notification's
timeline, an appointment's story."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from connector.commands.ledger import health_facts
from connector.models import State
from connector.web.console import chart

if TYPE_CHECKING:
    from markupsafe import Markup

    from connector.config import Config
    from connector.health import Finding
    from connector.ledger import NotificationRecord, SeenVersion
    from connector.ledger.console import Detail
    from connector.ledger.journal import Event
    from connector.ledger.sql import SqlLedger


@dataclass
class Overview:
    findings: list[Finding]
    counts: dict[State, int]
    cursors: dict[str, datetime]
    quarantined: dict[str, int]
    oldest_due: datetime | None
    attention: list[NotificationRecord]
    day_chart: Markup
    month_chart: Markup
    skipped: list[tuple[str, int]]
    now: datetime
    problems: list[tuple[str, SeenVersion]] = field(default_factory=list)  # the latest quarantined versions


def overview(config: Config, ledger: SqlLedger, now: datetime) -> Overview:
    console, reports = ledger.console, ledger.reports
    day_since = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
    month_since = now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=29)
    return Overview(
        findings=health_facts(config, ledger.health, now),
        counts=reports.counts(),
        cursors=reports.cursors(),
        quarantined=reports.quarantined(),
        oldest_due=console.oldest_due(),
        attention=reports.notifications([State.IN_DOUBT, State.FAILED], 20),
        day_chart=chart.stacked_bars(
            console.buckets(day_since, "hour"), chart.slots(now, "hour"), "notifications per hour, last 24 hours"
        ),
        month_chart=chart.stacked_bars(
            console.buckets(month_since, "day"), chart.slots(now, "day"), "notifications per day, last 30 days"
        ),
        skipped=console.skipped_reasons(month_since),
        now=now,
        problems=reports.problems(10),
    )


@dataclass(frozen=True)
class Step:
    """One line of a notification's timeline."""

    at: datetime | None
    what: str
    detail: str = ""
    actor: str | None = None


@dataclass
class Timeline:
    detail: Detail
    steps: list[Step] = field(default_factory=list)


def timeline(detail: Detail) -> Timeline:
    """The story in time order: the journal (planned, claimed, sending, outcomes, webhooks and receipts,
    withdrawals, doubt), what people did (the audit trail: CLI and console), and, for what happened before
    the journal existed or after its retention, what the row itself remembers."""
    n = detail.record
    steps = [Step(e.at, e.event if not e.state else f"{e.event}: {e.state}", e.detail or "") for e in detail.journal]
    if not detail.journal:  # older than the journal: the row's own times
        steps += _from_row(detail)
    steps.append(Step(n.due_at, "due", "the time it is (or was) to be sent"))
    for entry in detail.audit:
        what = entry.action if entry.count or entry.action == "preview" else f"{entry.action} (changed nothing)"
        if entry.from_state and entry.to_state:
            what = f"{what}: {entry.from_state.value} → {entry.to_state.value}"
        via = "CLI" if entry.role == "cli" else "console"
        steps.append(Step(entry.at, what, f"{via}; reason: {entry.reason}", entry.actor))
    far = datetime.max.replace(tzinfo=n.due_at.tzinfo)
    steps.sort(key=lambda s: (s.at is None, s.at or far))  # stable: the journal's order holds within a time
    return Timeline(detail, steps)


def _from_row(detail: Detail) -> list[Step]:
    n = detail.record
    steps = [Step(detail.created_at, "planned", f"{n.event} from {n.resource_type} version {n.resource_version}")]
    if n.first_attempt_at is not None:
        steps.append(Step(n.first_attempt_at, "claimed", f"first attempt to send; {n.attempts} attempt(s) counted"))
    if n.resends:
        steps.append(Step(None, "resent", f"sent again deliberately {n.resends} time(s)"))
    if detail.sent_at is not None:
        tracking = f"Paubox tracking id {n.tracking_id}" if n.tracking_id else "no tracking id"
        steps.append(Step(detail.sent_at, "sent", tracking))
    if detail.alerted_at is not None:
        steps.append(Step(detail.alerted_at, "reported in doubt", "the operators were alerted"))
    if n.delivery_status:
        steps.append(Step(detail.delivery_updated_at, "delivery", f"delivery status {n.delivery_status}"))
    if n.state not in (State.PENDING, State.SENT) or n.reason:
        steps.append(Step(n.updated_at, f"now {n.state.value}", n.reason or ""))
    return steps


@dataclass
class AppointmentStory:
    appointment_id: str
    notifications: list[NotificationRecord]
    states: list[Any]  # remembered states (connector.ledger.schema.AppointmentStateRow rows)
    versions: list[Any]  # versions seen (SeenVersionRow rows)
    transitions: list[Event]  # what intake saw change, oldest first (the journal)


def appointment(ledger: SqlLedger, appointment_id: str) -> AppointmentStory:
    notifications, seen = ledger.console.appointment(appointment_id)
    states = [row for row in seen if hasattr(row, "status")]
    versions = [row for row in seen if hasattr(row, "seen_at")]
    return AppointmentStory(
        appointment_id, notifications, states, versions, ledger.journal.of_appointment(appointment_id)
    )
