"""Pure: the per-patient daily safety cap (`limits.per_patient_per_day`), so that no bug or mass update can
flood one person. A notification due while its patient already has `limit` emails in the same local day
(the source's zone) is deferred to the start of the next local day (then past quiet hours), or skipped
with the reason; a deferral that would land at or after the appointment start is a skip.

    over_cap(count=3, limit=3, now=now, zone="Europe/Amsterdam", quiet=None, start=None, mode="defer")
    → Deferred(due=<next local midnight>, reason="...")
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from connector.timing import QuietHours

Mode = Literal["defer", "skip"]


@dataclass(frozen=True)
class Deferred:
    due: datetime
    reason: str


@dataclass(frozen=True)
class Skipped:
    reason: str


def local_day(now: datetime, zone: str) -> tuple[datetime, datetime]:
    """The local calendar day `now` falls in, in the zone, as [start, end) instants (DST days are 23 or 25 h)."""
    tz = ZoneInfo(zone)
    today = now.astimezone(tz).date()
    start = datetime.combine(today, datetime.min.time(), tzinfo=tz)
    end = datetime.combine(today + timedelta(days=1), datetime.min.time(), tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def over_cap(
    *,
    count: int,
    limit: int | None,
    now: datetime,
    zone: str,
    quiet: QuietHours | None,
    start: datetime | None,
    mode: Mode,
) -> Deferred | Skipped | None:
    """None: under the cap, send. Else when to try again (Deferred) or why not at all (Skipped)."""
    if limit is None or count < limit:
        return None
    reason = f"daily cap: {count} email(s) already sent to this patient today ({zone}; limit {limit})"
    if mode == "skip":
        return Skipped(reason)
    _, until = local_day(now, zone)
    due = until.astimezone(ZoneInfo(zone))
    if quiet is not None and quiet.contains(due):
        due = quiet.end_of(due)
    if start is not None and due >= start:
        return Skipped(f"{reason}; the next day begins after the appointment start")
    return Deferred(due, f"{reason}; deferred to the next local day")
