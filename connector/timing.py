"""Pure: when a notification goes out. Offsets from the start, the late rule, and quiet hours.

due = now                                   (confirmations, cancellations, ...)
due = start + offset                        (reminders: `at: start - 48h`)
reminder already due when first seen → now, if within the mapping's `late_grace`; else skipped
due inside quiet hours (appointment's zone) → the end of the quiet period
due at or after the appointment start     → skipped: nothing goes out once the visit has begun
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from connector.units import parse_duration

_OFFSET = re.compile(r"^\s*start\s*(?:([+-])\s*(\S+))?\s*$")


def parse_offset(text: str) -> timedelta:
    """'start - 48h' → -48 h; 'start' → 0; 'start + 30m' → +30 min."""
    match = _OFFSET.match(text)
    if not match:
        raise ValueError(f"{text!r}: expected `start - <duration>`, e.g. start - 48h")
    if match.group(1) is None:
        return timedelta(0)
    amount: timedelta = parse_duration(match.group(2))
    return -amount if match.group(1) == "-" else amount


def offset_label(offset: timedelta) -> str:
    """A stable, readable suffix for notification keys: 'start-48h', 'start-90m', 'start'."""
    seconds = int(offset.total_seconds())
    if seconds == 0:
        return "start"
    sign, seconds = ("-" if seconds < 0 else "+"), abs(seconds)
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"start{sign}{seconds // size}{unit}"
    return f"start{sign}{seconds}s"


@dataclass(frozen=True)
class QuietHours:
    """A daily quiet period in local time; may cross midnight (21:00–08:00)."""

    begin: time
    end: time

    def contains(self, local: datetime) -> bool:
        moment = local.time()
        if self.begin <= self.end:
            return self.begin <= moment < self.end
        return moment >= self.begin or moment < self.end

    def end_of(self, local: datetime) -> datetime:
        """The end of the quiet period `local` falls in."""
        day = local.date()
        if self.begin > self.end and local.time() >= self.begin:
            day += timedelta(days=1)
        return datetime.combine(day, self.end, tzinfo=local.tzinfo)


@dataclass(frozen=True)
class Schedule:
    due: datetime | None
    skipped: str | None = None


def schedule(
    *,
    now: datetime,
    start: datetime | None,
    offset: timedelta | None,
    zone: str,
    quiet: QuietHours | None,
    late_grace: timedelta | None,
) -> Schedule:
    """When to send: `offset` is None for "as soon as the event is seen", else relative to `start`."""
    if offset is None:
        due = now
    else:
        if start is None:
            return Schedule(None, "the appointment has no start time to count from")
        due = start + offset
        if due < now:
            if late_grace is None or now - due > late_grace:
                return Schedule(None, f"its time ({offset_label(offset)}) had passed when the appointment was seen")
            due = now
    if quiet is not None:
        local = due.astimezone(ZoneInfo(zone))
        if quiet.contains(local):
            due = quiet.end_of(local).astimezone(due.tzinfo)
            if start is not None and due >= start:
                return Schedule(
                    None, f"quiet hours until {quiet.end.strftime('%H:%M')} ({zone}) last past the appointment start"
                )
    if start is not None and due >= start:
        return Schedule(None, "the appointment start has already passed")
    return Schedule(due)
