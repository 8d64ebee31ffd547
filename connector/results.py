"""Result values of the shell's work, which the CLI prints (connector.report) and tests read: what a poll,
a dispatch run, a cycle, a replay and a dry run did. Values only: ids, keys, counts, states and reasons,
never patient data."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from connector.ledger import NotificationRecord, SeenVersion
    from connector.models import PlannedNotification, PlanNote


@dataclass
class PollReport:
    source: str
    pages: int = 0
    resources: int = 0
    new_versions: int = 0
    planned: int = 0
    inserted: int = 0
    quarantined: int = 0  # versions that could not be processed (invalid, or failed while planned)
    error: str | None = None
    skipped: bool = False  # another replica held this source's poll lock


class Step(StrEnum):
    """What a dispatch run did with one notification."""

    SENT = "sent"
    FAILED = "failed"
    IN_DOUBT = "in_doubt"
    RETRY = "retry"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    RELEASED = "released"  # put back untouched (source unreachable, lease lost, unexpected error)
    WAITING = "waiting"  # put back for the mailer: rate limited, circuit open, paused
    DEFERRED = "deferred"  # put off until later: the patient reached the daily cap (limits.per_patient_per_day)


@dataclass
class DispatchReport:
    steps: dict[Step, int] = field(default_factory=lambda: dict.fromkeys(Step, 0))
    paused: str | None = None  # a configuration problem stopped sending (wrong key, base URL)
    waiting: str | None = None  # the mailer gate is closed for now (rate limited, circuit open)

    @property
    def sent(self) -> int:
        return self.steps[Step.SENT]


@dataclass
class CycleReport:
    polls: list[PollReport] = field(default_factory=list)
    dispatch: DispatchReport | None = None

    @property
    def ok(self) -> bool:
        return all(p.error is None for p in self.polls) and not (self.dispatch and self.dispatch.paused)


@dataclass
class ReplayItem:
    notification: PlannedNotification
    existing: NotificationRecord | None
    inserted: bool


@dataclass
class Replay:
    items: list[ReplayItem] = field(default_factory=list)
    notes: list[tuple[str, PlanNote]] = field(default_factory=list)  # (appointment id, note)
    quarantined: list[tuple[str, SeenVersion]] = field(default_factory=list)  # (source, version with its problem)

    def __iadd__(self, other: Replay) -> Replay:
        self.items += other.items
        self.notes += other.notes
        self.quarantined += other.quarantined
        return self


@dataclass(frozen=True)
class DryRun:
    """What a run would do: newly planned notifications (with what the recipient rules say of them), the
    mappings that chose not to send, the versions it would quarantine, and the due notifications it would
    send."""

    planned: list[ReplayItem]
    notes: list[tuple[str, PlanNote]]
    verdicts: dict[str, str]
    due: list[NotificationRecord]
    errors: list[str]
    quarantined: list[tuple[str, SeenVersion]]


@dataclass(frozen=True)
class Replayed:
    items: list[ReplayItem]
    notes: list[tuple[str, PlanNote]]
    verdicts: dict[str, str]  # dry run: what the recipient rules say
    final: dict[str, NotificationRecord]  # real run: where each notification ended
    quarantined: list[tuple[str, SeenVersion]]  # (source, version or event with its problem)


class Tracker(Protocol):
    """Told how long work goes (a progress bar on a terminal): a phase, with its total when known, then
    each unit done."""

    def phase(self, description: str, total: int | None = None) -> None: ...

    def advance(self, count: int = 1) -> None: ...


class Untracked:
    """A Tracker that shows nothing."""

    def phase(self, description: str, total: int | None = None) -> None:
        return None

    def advance(self, count: int = 1) -> None:
        return None
