"""Pure: what a bounce does to one patient's address. A hard bounce suppresses it; soft bounces are counted
in a window (`bounces.soft_window`), and the `bounces.soft_limit`-th within it suppresses it as a hard one
would. A suppression lasts until an operator clears it or the patient's chosen address changes (it is kept
per address: a new address is not suppressed); a bounce after a clearing suppresses again.

    after_bounce(None, hard=False, now=t, soft_limit=3, soft_window=7d) → Tally(soft_count=1, soft_since=t, ...)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from connector.units import human_duration


@dataclass(frozen=True)
class Tally:
    soft_count: int = 0
    soft_since: datetime | None = None
    suppressed_at: datetime | None = None
    reason: str | None = None
    cleared_at: datetime | None = None

    @property
    def suppressed(self) -> bool:
        return self.suppressed_at is not None and self.cleared_at is None


def after_bounce(before: Tally | None, *, hard: bool, now: datetime, soft_limit: int, soft_window: timedelta) -> Tally:
    tally = before or Tally()
    if tally.suppressed:
        return tally  # already suppressed: the first reason and time stand
    if hard:
        return Tally(0, None, now, "hard bounce", None)
    if tally.soft_since is None or now - tally.soft_since > soft_window:
        tally = replace(tally, soft_count=0, soft_since=now)
    count = tally.soft_count + 1
    if count >= soft_limit:
        return Tally(count, tally.soft_since, now, f"{count} soft bounces within {human_duration(soft_window)}", None)
    return replace(tally, soft_count=count)


def skip_reason(patient_id: str, tally: Tally) -> str:
    """The reason a notification to a suppressed address is skipped (the hand-off reads `bounced`)."""
    when = tally.suppressed_at.date().isoformat() if tally.suppressed_at else "?"
    return (
        f"Patient/{patient_id}: the chosen address bounced ({tally.reason}, {when}); it stays suppressed "
        "until the EHR has another address or an operator clears it"
    )
