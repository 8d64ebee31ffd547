"""Pure: where a poll of a source reads from, and how far its cursor may move.

The cursor is the newest `meta.lastUpdated` committed for a source (server time, never ours). A *sweep*
reads from the cursor minus `overlap`, so that changes committed late, with an older lastUpdated, are read
again; a sweep is due every `sweep` (with half an interval of slack, so that `sweep` <= `interval` makes
every poll a sweep) and the first poll of a process is one. The polls in between start where the last one
in this process ended. A first poll ever starts at `start_from` and records that point (plus the overlap)
as the cursor, so that what changes before the first appointment arrives is not skipped.

A lastUpdated in the future (a server clock ahead, a bad import) must not carry the cursor past changes
still to come: what a poll sees counts no further than the wall clock. So the cursor never passes the
wall clock plus the overlap, and it never moves back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from connector.intake.checks import later

if TYPE_CHECKING:
    from connector.config.sources import FhirPollSourceConfig


def since(cursor: datetime | None, settings: FhirPollSourceConfig, now: datetime) -> datetime:
    """Where a sweep reads from: the cursor less the overlap; before any cursor, `start_from`."""
    if cursor is not None:
        return cursor - settings.overlap
    return now if settings.start_from == "now" else settings.start_from


def in_future(updated: datetime, overlap: timedelta, wall: datetime) -> bool:
    """A lastUpdated beyond the wall clock plus the overlap: held at the present (see `bounded`)."""
    return updated > wall + overlap


def bounded(updated: datetime, overlap: timedelta, wall: datetime) -> datetime:
    """A lastUpdated as far as the cursor may follow it: no further than the wall clock when it lies beyond
    the wall clock plus the overlap."""
    return wall if in_future(updated, overlap, wall) else updated


@dataclass(frozen=True)
class PollWindow:
    """One poll: the committed cursor it started from, where it reads from, when it began if it is a sweep,
    and the newest lastUpdated it has seen so far (bounded)."""

    cursor: datetime
    since: datetime
    sweep: datetime | None = None
    highest: datetime | None = None

    def saw(self, updated: datetime, overlap: timedelta, wall: datetime) -> PollWindow:
        return replace(self, highest=later(self.highest, bounded(updated, overlap, wall)))

    @property
    def newest(self) -> datetime:
        """Where the cursor may go once what this poll read is committed: never back, never further than the
        wall clock plus the overlap (unless it was there already)."""
        found = later(self.cursor, self.highest)
        assert found is not None
        return found


@dataclass(frozen=True)
class Progress:
    """What this process remembers of a source's polls: when the last sweep began, and where the last poll
    that read everything it meant to ended."""

    swept: datetime | None = None
    resume: datetime | None = None

    def due(self, now: datetime, settings: FhirPollSourceConfig) -> bool:
        """Is the next poll a sweep: the first of a process, or `sweep` less half an interval after the last
        one began."""
        return (
            self.swept is None or self.resume is None or abs(now - self.swept) >= settings.sweep - settings.interval / 2
        )

    def start(
        self,
        cursor: datetime,
        since: datetime,
        now: datetime,
        settings: FhirPollSourceConfig,
        sweep: bool | None = None,
    ) -> PollWindow:
        """The next poll: a sweep from `since`, or, between sweeps, a poll from where the last one ended.
        `sweep` decides which (None: a sweep when one is due); before any poll ended, only a sweep will do."""
        if sweep is None:
            sweep = self.due(now, settings)
        if not sweep and self.resume is not None:
            return PollWindow(cursor, max(since, self.resume))
        return PollWindow(cursor, since, sweep=now)

    def done(self, window: PollWindow) -> Progress:
        """A poll read everything from its `since` on: the next one may start from the newest it saw. Polls
        may end out of order (a sweep that ran beside quicker polls ends after them): where to resume never
        moves back, since what each of them read stays read."""
        resume = max(window.since, window.highest) if window.highest is not None else window.since
        return Progress(window.sweep if window.sweep is not None else self.swept, later(self.resume, resume))

    def sweep_next(self) -> Progress:
        """Make the next poll a sweep (a Subscription reported a gap, say)."""
        return replace(self, swept=None)
