"""The cursor/sweep plan of a poll (connector.intake.cursor): a frozen value with pure transitions, as a
table and as properties. The cursor never passes the wall clock plus the overlap, and never moves back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.config.sources import FhirPollSourceConfig
from connector.intake.cursor import PollWindow, Progress, bounded, since

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


def settings(**given: object) -> FhirPollSourceConfig:
    values: dict[str, object] = {"base_url": "https://ehr.example.org/fhir", **given}
    return FhirPollSourceConfig.model_validate(values)


DEFAULT = settings()  # interval 60s, overlap 5m, sweep 1m, start_from now


@pytest.mark.parametrize(
    ("cursor", "config", "expected"),
    [
        (NOW, DEFAULT, NOW - 5 * MIN),  # a cursor: read the overlap again
        (None, DEFAULT, NOW),  # first poll ever, start_from: now
        (None, settings(start_from="2000-01-01T00:00:00Z"), datetime(2000, 1, 1, tzinfo=UTC)),
        (NOW, settings(start_from="2000-01-01T00:00:00Z"), NOW - 5 * MIN),  # start_from counts once only
    ],
)
def test_where_a_sweep_reads_from(cursor: datetime | None, config: FhirPollSourceConfig, expected: datetime) -> None:
    assert since(cursor, config, NOW) == expected


SLOW_SWEEPS = settings(interval="60s", sweep="10m", overlap="20m")


@pytest.mark.parametrize(
    ("progress", "config", "now", "expected"),
    [
        # The first poll of a process is a sweep, from the cursor less the overlap.
        (Progress(), SLOW_SWEEPS, NOW, PollWindow(NOW, NOW - 20 * MIN, sweep=NOW)),
        # Between sweeps: from where the last poll ended (never before the sweep's start).
        (Progress(NOW - MIN, NOW - MIN), SLOW_SWEEPS, NOW, PollWindow(NOW, NOW - MIN)),
        (Progress(NOW - MIN, NOW - 30 * MIN), SLOW_SWEEPS, NOW, PollWindow(NOW, NOW - 20 * MIN)),
        # A sweep is due once `sweep` less half an interval has passed since the last one began.
        (Progress(NOW - 10 * MIN, NOW - MIN), SLOW_SWEEPS, NOW, PollWindow(NOW, NOW - 20 * MIN, sweep=NOW)),
        (Progress(NOW - 9 * MIN, NOW - MIN), SLOW_SWEEPS, NOW, PollWindow(NOW, NOW - MIN)),
        # sweep <= interval: every poll is a sweep.
        (Progress(NOW - MIN, NOW - MIN), DEFAULT, NOW, PollWindow(NOW, NOW - 5 * MIN, sweep=NOW)),
        # A Subscription reported a gap: the next poll sweeps.
        (Progress(NOW - MIN, NOW - MIN).sweep_next(), SLOW_SWEEPS, NOW, PollWindow(NOW, NOW - 20 * MIN, sweep=NOW)),
    ],
)
def test_the_next_poll_is_a_sweep_or_resumes(
    progress: Progress, config: FhirPollSourceConfig, now: datetime, expected: PollWindow
) -> None:
    assert progress.start(NOW, since(NOW, config, now), now, config) == expected


@pytest.mark.parametrize(
    ("progress", "due", "sweep", "expected"),
    [
        # A quick poll beside a sweep that is due: from where the last poll ended all the same.
        (Progress(NOW - 10 * MIN, NOW - MIN), True, False, PollWindow(NOW, NOW - MIN)),
        # Before any poll of the process ended there is nowhere to resume from: only a sweep will do.
        (Progress(), True, False, PollWindow(NOW, NOW - 20 * MIN, sweep=NOW)),
        (Progress(NOW - MIN, None), True, False, PollWindow(NOW, NOW - 20 * MIN, sweep=NOW)),
        # A sweep asked for, though none is due.
        (Progress(NOW - MIN, NOW - MIN), False, True, PollWindow(NOW, NOW - 20 * MIN, sweep=NOW)),
    ],
)
def test_a_poll_may_be_told_to_sweep_or_not(progress: Progress, due: bool, sweep: bool, expected: PollWindow) -> None:
    assert progress.due(NOW, SLOW_SWEEPS) == due
    assert progress.start(NOW, since(NOW, SLOW_SWEEPS, NOW), NOW, SLOW_SWEEPS, sweep) == expected


@pytest.mark.parametrize(
    ("progress", "window", "expected"),
    [
        (Progress(), PollWindow(NOW, NOW - MIN, sweep=NOW, highest=NOW + MIN), Progress(NOW, NOW + MIN)),
        (Progress(NOW - MIN, None), PollWindow(NOW, NOW - MIN), Progress(NOW - MIN, NOW - MIN)),  # saw nothing
        (Progress(NOW - MIN, None), PollWindow(NOW, NOW, highest=NOW - MIN), Progress(NOW - MIN, NOW)),
    ],
)
def test_a_completed_poll_is_where_the_next_one_resumes(
    progress: Progress, window: PollWindow, expected: Progress
) -> None:
    assert progress.done(window) == expected


@pytest.mark.parametrize(
    ("updated", "expected"),
    [
        (NOW - MIN, NOW - MIN),  # the past: as it is
        (NOW + 5 * MIN, NOW + 5 * MIN),  # within the overlap ahead of the wall clock: believed
        (NOW + 5 * MIN + timedelta(seconds=1), NOW),  # beyond it (a clock ahead): held at the present
        (datetime(9999, 1, 1, tzinfo=UTC), NOW),
    ],
)
def test_a_future_last_updated_is_held_at_the_present(updated: datetime, expected: datetime) -> None:
    assert bounded(updated, 5 * MIN, NOW) == expected


instants = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))


@given(
    cursor=instants,
    wall=instants,
    overlap=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=2)),
    seen=st.lists(instants | st.datetimes(timezones=st.just(UTC)).filter(lambda d: d.year < 9999), max_size=20),
)
def test_the_cursor_never_moves_back_nor_past_the_wall_clock_plus_the_overlap(
    cursor: datetime, wall: datetime, overlap: timedelta, seen: list[datetime]
) -> None:
    window = PollWindow(cursor, cursor - overlap)
    for updated in seen:
        moved = window.saw(updated, overlap, wall)
        assert moved.newest >= window.newest >= cursor  # never back
        assert moved.newest <= max(cursor, wall + overlap)  # never past now + overlap
        window = moved


@given(
    polls=st.lists(st.tuples(instants, st.none() | instants, st.booleans()), max_size=10),
)
def test_progress_only_remembers_the_furthest_a_poll_ended_and_when_a_sweep_began(
    polls: list[tuple[datetime, datetime | None, bool]],
) -> None:
    """Polls may end out of order (a sweep beside quick polls): where to resume never moves back."""
    progress = Progress()
    for start, highest, sweep in polls:
        window = PollWindow(start, start, sweep=start if sweep else None, highest=highest)
        after = progress.done(window)
        ended = max(start, highest) if highest else start
        assert after.resume == (ended if progress.resume is None else max(progress.resume, ended))
        assert after.swept == (start if sweep else progress.swept)
        progress = after
